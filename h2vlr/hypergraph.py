"""Construction of the heterogeneous hypergraph of one query image at one feature layer.

Pure functions on tensors, no parameters. Nodes are laid out as ``[query patches (Nq) |
support patches (Ns) | concepts (C)]``. Every hyperedge has an anchor, its first member,
and is stored in torch_geometric's incidence form: ``hyperedge_index`` ``[2, nnz]`` with
the node row first and the hyperedge row second.

Weights come from the cosine similarities that formed a hyperedge. ``member_weight`` is
the softmax over the members of ``cos(anchor, member) / temperature``, where the anchor
itself has cosine 1. ``hyperedge_weight`` is the mean of ``(1 + cos) / 2`` over the
non-anchor members, so it lies in ``[0, 1]``; a hyperedge of the anchor alone weighs 1.
Inputs are L2-normalised features, so a dot product is the cosine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Node types, the rows of the type embedding.
QUERY, SUPPORT, CONCEPT = 0, 1, 2
# Hyperedge kinds.
VISUAL, SPATIAL, SEMANTIC = 0, 1, 2


@dataclass(frozen=True)
class Hyperedges:
    """A set of hyperedges; ``E`` hyperedges with ``nnz`` memberships in total."""

    index: Tensor  # [2, nnz] long: node row, hyperedge row (0..E-1); anchor listed first
    weight: Tensor  # [E] float in [0, 1]
    member_weight: Tensor  # [nnz] float; sums to 1 over the members of each hyperedge
    member_cosine: Tensor  # [nnz] float: cosine of each member to its anchor (anchor: 1)
    kind: Tensor  # [E] long: VISUAL, SPATIAL or SEMANTIC
    num_edges: int  # E, passed explicitly because the last hyperedges may be empty

    @staticmethod
    def empty() -> Hyperedges:
        return Hyperedges(
            index=torch.zeros(2, 0, dtype=torch.long),
            weight=torch.zeros(0),
            member_weight=torch.zeros(0),
            member_cosine=torch.zeros(0),
            kind=torch.zeros(0, dtype=torch.long),
            num_edges=0,
        )


@dataclass(frozen=True)
class Hypergraph:
    """Node features, node types and hyperedges of one or more disjoint components."""

    x: Tensor  # [V, D] node features
    node_type: Tensor  # [V] long: QUERY, SUPPORT or CONCEPT
    edges: Hyperedges


def _from_members(
    members: Tensor, valid: Tensor, cosine: Tensor, kind: int, temperature: float
) -> Hyperedges:
    """Turn a padded member table into hyperedges.

    Args:
        members: ``[E, P]`` global node ids; column 0 is the anchor.
        valid: ``[E, P]`` bool, False on padding.
        cosine: ``[E, P]`` cosine of each member to its anchor (column 0 is 1).
        kind: hyperedge kind of all ``E`` hyperedges.
        temperature: softmax temperature of the member weights.
    """
    num_edges, width = members.shape
    logits = (cosine / temperature).masked_fill(~valid, float("-inf"))
    member_weight = torch.softmax(logits, dim=1)

    others = valid.clone()
    others[:, 0] = False
    count = others.sum(dim=1)
    affinity = ((1.0 + cosine) / 2.0 * others).sum(dim=1)
    weight = torch.where(count > 0, affinity / count.clamp(min=1), torch.ones_like(affinity))

    edge_rows = torch.arange(num_edges, device=members.device).unsqueeze(1).expand(num_edges, width)
    index = torch.stack([members[valid], edge_rows[valid]])
    return Hyperedges(
        index=index,
        weight=weight.float(),
        member_weight=member_weight[valid].float(),
        member_cosine=cosine[valid].float(),
        kind=torch.full((num_edges,), kind, dtype=torch.long, device=members.device),
        num_edges=num_edges,
    )


def visual_affinity_hyperedges(
    query: Tensor, support: Tensor, k: int, support_offset: int, temperature: float = 0.1
) -> Hyperedges:
    """Build one hyperedge per query patch: the patch and its ``k`` nearest support patches.

    Args:
        query: ``[Nq, D]`` unit query patches, node ids ``0..Nq-1``.
        support: ``[Ns, D]`` unit support patches, node ids ``support_offset + j``.
        k: neighbours per query patch; capped at ``Ns``.
        support_offset: node id of the first support patch.
        temperature: softmax temperature of the member weights.
    """
    k = min(k, support.shape[0])
    similarity = query @ support.T  # [Nq, Ns]
    cosine, neighbours = similarity.topk(k, dim=1)
    anchors = torch.arange(query.shape[0], device=query.device).unsqueeze(1)
    members = torch.cat([anchors, neighbours + support_offset], dim=1)
    cosine = torch.cat([torch.ones_like(cosine[:, :1]), cosine], dim=1)
    return _from_members(
        members, torch.ones_like(members, dtype=torch.bool), cosine, VISUAL, temperature
    )


def neighbour_table(positions: Tensor, groups: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Return the padded member table of the spatial hyperedges of ``n`` patches.

    Row ``i`` contains patch ``i``, then its neighbours in ascending order: the patches of
    the same group within ``size // 2`` rows and columns of it on the grid.

    Args:
        positions: ``[n, 2]`` long (row, column) on the patch grid.
        groups: ``[n]`` long image index of each patch.
        size: side ``r`` of the neighbourhood; even sizes act as ``r + 1``.

    Returns:
        local ``[n, P]`` long patch indices (column 0 is the patch itself) and valid
        ``[n, P]`` bool, False on padding.
    """
    reach = size // 2
    delta = (positions.unsqueeze(1) - positions.unsqueeze(0)).abs()  # [n, n, 2]
    near = (delta <= reach).all(dim=2) & (groups.unsqueeze(1) == groups.unsqueeze(0))
    near.fill_diagonal_(False)

    width = int(near.sum(dim=1).max().item()) if near.numel() else 0
    count = positions.shape[0]
    # Stable sort puts the neighbours (True) first, in node order.
    order = torch.sort(near.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    valid_others = torch.gather(near, 1, order)
    anchors = torch.arange(count, device=positions.device).unsqueeze(1)
    local = torch.cat([anchors, order], dim=1)
    valid = torch.cat([torch.ones_like(anchors, dtype=torch.bool), valid_others], dim=1)
    return local, valid


@functools.lru_cache(maxsize=16)
def grid_neighbour_table(
    grid_size: tuple[int, int], size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Return the ``neighbour_table`` of a full patch grid, computed once per grid, size
    and device.

    The returned tensors are shared between callers and must not be modified.
    """
    count = grid_size[0] * grid_size[1]
    groups = torch.zeros(count, dtype=torch.long, device=device)
    return neighbour_table(grid_positions(grid_size, device), groups, size)


def table_hyperedges(
    features: Tensor, local: Tensor, valid: Tensor, node_offset: int, temperature: float = 0.1
) -> Hyperedges:
    """Build spatial hyperedges from a ``neighbour_table`` and the patch features.

    Args:
        features: ``[n, D]`` unit patch features, node ids ``node_offset + i``.
        local: ``[n, P]`` long member table from ``neighbour_table``.
        valid: ``[n, P]`` bool, False on padding.
        node_offset: node id of the first patch.
        temperature: softmax temperature of the member weights.
    """
    cosine = (features.unsqueeze(1) * features[local]).sum(dim=-1)
    cosine[:, 0] = 1.0
    return _from_members(local + node_offset, valid, cosine, SPATIAL, temperature)


def spatial_hyperedges(
    features: Tensor,
    positions: Tensor,
    groups: Tensor,
    size: int,
    node_offset: int,
    temperature: float = 0.1,
) -> Hyperedges:
    """Build one hyperedge per patch: the patch and the patches of its ``size x size`` block.

    Neighbours must share the patch's group (its image) and lie within ``size // 2`` rows
    and columns of it on the patch grid. Patches missing from ``features``, for example
    dropped by a coreset, are absent from the hyperedges.

    Args:
        features: ``[n, D]`` unit patch features, node ids ``node_offset + i``.
        positions: ``[n, 2]`` long (row, column) on the patch grid.
        groups: ``[n]`` long image index of each patch.
        size: side ``r`` of the neighbourhood; even sizes act as ``r + 1``.
        node_offset: node id of the first patch.
        temperature: softmax temperature of the member weights.
    """
    local, valid = neighbour_table(positions, groups, size)
    return table_hyperedges(features, local, valid, node_offset, temperature)


def top_members(concepts: Tensor, patches: Tensor, members: int) -> tuple[Tensor, Tensor]:
    """Return the cosines ``[C, m]`` and indices ``[C, m]`` of each concept's ``m`` most
    similar patches, ``m = min(members, n)``, for unit ``[C, D]`` concepts and ``[n, D]``
    patches."""
    return (concepts @ patches.T).topk(min(members, patches.shape[0]), dim=1)


def semantic_hyperedges(
    concepts: Tensor,
    query: Tensor,
    support: Tensor,
    members: int,
    concept_offset: int,
    support_offset: int,
    temperature: float = 0.1,
    support_top: tuple[Tensor, Tensor] | None = None,
) -> Hyperedges:
    """Build one hyperedge per concept: the concept, its ``members`` most similar query
    patches and its ``members`` most similar support patches.

    Args:
        concepts: ``[C, D]`` unit concept embeddings, node ids ``concept_offset + c``.
        query: ``[Nq, D]`` unit query patches, node ids ``0..Nq-1``.
        support: ``[Ns, D]`` unit support patches, node ids ``support_offset + j``.
        members: ``M``, capped at ``Nq`` and ``Ns`` respectively.
        temperature: softmax temperature of the member weights.
        support_top: ``top_members(concepts, support, members)`` when already known (it
            does not depend on the query).
    """
    query_cos, query_ids = top_members(concepts, query, members)
    if support_top is None:
        support_top = top_members(concepts, support, members)
    support_cos, support_ids = support_top
    anchors = torch.arange(concepts.shape[0], device=concepts.device).unsqueeze(1)
    anchors = anchors + concept_offset
    node_ids = torch.cat([anchors, query_ids, support_ids + support_offset], dim=1)
    cosine = torch.cat([torch.ones_like(query_cos[:, :1]), query_cos, support_cos], dim=1)
    valid = torch.ones_like(node_ids, dtype=torch.bool)
    return _from_members(node_ids, valid, cosine, SEMANTIC, temperature)


def concat_hyperedges(parts: Sequence[Hyperedges]) -> Hyperedges:
    """Join hyperedge sets over the same nodes, renumbering the hyperedge rows."""
    parts = [part for part in parts if part.num_edges > 0]
    if not parts:
        return Hyperedges.empty()
    indices = []
    edge_offset = 0
    for part in parts:
        indices.append(part.index + torch.tensor([[0], [edge_offset]], device=part.index.device))
        edge_offset += part.num_edges
    index = torch.cat(indices, dim=1)
    return Hyperedges(
        index=index,
        weight=torch.cat([part.weight for part in parts]),
        member_weight=torch.cat([part.member_weight for part in parts]),
        member_cosine=torch.cat([part.member_cosine for part in parts]),
        kind=torch.cat([part.kind for part in parts]),
        num_edges=sum(part.num_edges for part in parts),
    )


def pairwise_expansion(edges: Hyperedges, temperature: float = 0.1) -> Hyperedges:
    """Replace each hyperedge by 2-node edges, its anchor with each other member.

    A pair edge keeps the kind of its hyperedge and gets the weights of a hyperedge of
    those two nodes. A hyperedge of its anchor alone has no pair and disappears.
    """
    node, edge = edges.index
    is_anchor = torch.ones_like(edge, dtype=torch.bool)
    is_anchor[1:] = edge[1:] != edge[:-1]  # rows are grouped by hyperedge, anchor first
    positions = torch.arange(edge.numel(), device=edge.device)
    anchor_position = torch.cummax(torch.where(is_anchor, positions, 0), 0).values
    others = ~is_anchor

    pair_nodes = torch.stack([node[anchor_position[others]], node[others]], dim=1)  # [P, 2]
    cosine = edges.member_cosine[others]
    pair_cos = torch.stack([torch.ones_like(cosine), cosine], dim=1)
    valid = torch.ones_like(pair_nodes, dtype=torch.bool)
    pairs = _from_members(pair_nodes, valid, pair_cos, VISUAL, temperature)
    return dataclasses.replace(pairs, kind=edges.kind[edge[others]])


def grid_positions(grid_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Return the ``[gh * gw, 2]`` (row, column) of each patch in row-major order."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


@dataclass(frozen=True)
class SupportBank:
    """Support patches of one feature layer, their place on the grid and their spatial
    hyperedges (node ids from 0; shifted when a query graph is built)."""

    features: Tensor  # [Ns, D] unit vectors
    positions: Tensor  # [Ns, 2] long (row, column)
    image_index: Tensor  # [Ns] long index of the support image (canonical order)
    spatial: Hyperedges  # spatial hyperedges inside each support image


def make_support_bank(
    features: Tensor,
    positions: Tensor,
    image_index: Tensor,
    spatial_size: int,
    temperature: float = 0.1,
) -> SupportBank:
    """Normalise support patches and build their spatial hyperedges once per fit.

    Args:
        features: ``[Ns, D]`` support patches.
        positions: ``[Ns, 2]`` long (row, column) on the patch grid.
        image_index: ``[Ns]`` long support image of each patch.
        spatial_size: ``r`` of the spatial hyperedges.
        temperature: softmax temperature of the member weights.
    """
    features = F.normalize(features.float(), dim=-1)
    spatial = spatial_hyperedges(features, positions, image_index, spatial_size, 0, temperature)
    return SupportBank(features, positions, image_index, spatial)


@dataclass(frozen=True)
class ConceptLinks:
    """Unit concepts and their support members at one feature layer; they do not depend
    on the query, so one value serves every query image."""

    concepts: Tensor  # [C, D] unit concept embeddings
    members: int  # M of the semantic hyperedges
    support_cosine: Tensor  # [C, m] cosine of each concept's m = min(M, Ns) support members
    support_ids: Tensor  # [C, m] long support index of those members


def link_concepts(concepts: Tensor, bank: SupportBank, members: int) -> ConceptLinks:
    """Normalise ``[C, D]`` concepts and find their ``members`` nearest support patches."""
    concepts = F.normalize(concepts.float(), dim=-1)
    support_cosine, support_ids = top_members(concepts, bank.features, members)
    return ConceptLinks(concepts, members, support_cosine, support_ids)


def _shift_nodes(edges: Hyperedges, offset: int) -> Hyperedges:
    shift = torch.tensor([[offset], [0]], device=edges.index.device)
    return dataclasses.replace(edges, index=edges.index + shift)


def build_hyperedges(
    query: Tensor,
    bank: SupportBank,
    links: ConceptLinks | None,
    grid_size: tuple[int, int],
    *,
    k_neighbors: int,
    spatial_size: int,
    pairwise: bool = False,
    temperature: float = 0.1,
) -> Hyperedges:
    """Build the hyperedges of one query image at one feature layer.

    Nodes are numbered ``[query (N) | support (Ns) | concepts (C)]`` as in
    ``build_hypergraph``.

    Args:
        query: ``[N, D]`` unit query patches in row-major grid order.
        bank: support patches of the same layer.
        links: concepts of the same layer, or None for no semantic hyperedges.
        grid_size: ``(gh, gw)`` with ``gh * gw == N``.
        k_neighbors: ``K`` of the visual-affinity hyperedges.
        spatial_size: ``r`` of the query's spatial hyperedges (the bank has its own).
        pairwise: expand every hyperedge into anchor-member pairs (a plain graph).
        temperature: softmax temperature of the member weights.
    """
    support = bank.features
    nq, ns = query.shape[0], support.shape[0]
    local, valid = grid_neighbour_table(tuple(grid_size), spatial_size, query.device)
    parts = [
        visual_affinity_hyperedges(query, support, k_neighbors, nq, temperature),
        table_hyperedges(query, local, valid, 0, temperature),
        _shift_nodes(bank.spatial, nq),
    ]
    if links is not None:
        parts.append(
            semantic_hyperedges(
                links.concepts,
                query,
                support,
                links.members,
                nq + ns,
                nq,
                temperature,
                support_top=(links.support_cosine, links.support_ids),
            )
        )
    edges = concat_hyperedges(parts)
    if pairwise:
        edges = pairwise_expansion(edges, temperature)
    return edges


def build_hypergraph(
    query: Tensor,
    bank: SupportBank,
    concepts: Tensor,
    grid_size: tuple[int, int],
    *,
    k_neighbors: int,
    spatial_size: int,
    semantic_members: int,
    semantic_edges: bool = True,
    pairwise: bool = False,
    temperature: float = 0.1,
) -> Hypergraph:
    """Build the hypergraph of one query image at one feature layer.

    Args:
        query: ``[N, D]`` query patches in row-major grid order (normalised here).
        bank: support patches of the same layer.
        concepts: ``[C, D]`` concept embeddings (normalised here).
        grid_size: ``(gh, gw)`` with ``gh * gw == N``.
        k_neighbors: ``K`` of the visual-affinity hyperedges.
        spatial_size: ``r`` of the query's spatial hyperedges (the bank has its own).
        semantic_members: ``M`` of the semantic hyperedges.
        semantic_edges: add the concept hyperedges.
        pairwise: expand every hyperedge into anchor-member pairs (a plain graph).
        temperature: softmax temperature of the member weights.
    """
    query = F.normalize(query.float(), dim=-1)
    links = link_concepts(concepts, bank, semantic_members)
    edges = build_hyperedges(
        query,
        bank,
        links if semantic_edges else None,
        grid_size,
        k_neighbors=k_neighbors,
        spatial_size=spatial_size,
        pairwise=pairwise,
        temperature=temperature,
    )
    nq, ns, nc = query.shape[0], bank.features.shape[0], links.concepts.shape[0]
    return Hypergraph(
        x=torch.cat([query, bank.features, links.concepts]),
        node_type=node_types(nq, ns, nc, query.device),
        edges=edges,
    )


def node_types(nq: int, ns: int, nc: int, device: torch.device) -> Tensor:
    """Return the ``[nq + ns + nc]`` node types of one component."""
    counts = torch.tensor([nq, ns, nc], device=device)
    return torch.repeat_interleave(torch.tensor([QUERY, SUPPORT, CONCEPT], device=device), counts)


def batch_hyperedges(parts: Sequence[Hyperedges], node_counts: Sequence[int]) -> Hyperedges:
    """Join the hyperedges of disjoint components, renumbering nodes and hyperedges.

    Args:
        parts: the hyperedges of each component, node ids from 0 within it.
        node_counts: the number of nodes of each component.
    """
    device = parts[0].index.device if parts else None
    node_offsets = torch.tensor([0, *node_counts[:-1]], device=device).cumsum(0)
    edge_offsets = torch.tensor([0, *[part.num_edges for part in parts[:-1]]], device=device)
    edge_offsets = edge_offsets.cumsum(0)
    sizes = torch.tensor([part.index.shape[1] for part in parts], device=device)
    offsets = torch.stack([node_offsets, edge_offsets]).repeat_interleave(sizes, dim=1)
    return Hyperedges(
        index=torch.cat([part.index for part in parts], dim=1) + offsets,
        weight=torch.cat([part.weight for part in parts]),
        member_weight=torch.cat([part.member_weight for part in parts]),
        member_cosine=torch.cat([part.member_cosine for part in parts]),
        kind=torch.cat([part.kind for part in parts]),
        num_edges=sum(part.num_edges for part in parts),
    )


def batch_hypergraphs(graphs: Sequence[Hypergraph]) -> Hypergraph:
    """Join graphs into one graph of disjoint components (nodes and hyperedges renumbered)."""
    edges = batch_hyperedges([graph.edges for graph in graphs], [g.x.shape[0] for g in graphs])
    return Hypergraph(
        x=torch.cat([graph.x for graph in graphs]),
        node_type=torch.cat([graph.node_type for graph in graphs]),
        edges=edges,
    )
