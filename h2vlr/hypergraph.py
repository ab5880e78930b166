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
    reach = size // 2
    delta = (positions.unsqueeze(1) - positions.unsqueeze(0)).abs()  # [n, n, 2]
    near = (delta <= reach).all(dim=2) & (groups.unsqueeze(1) == groups.unsqueeze(0))
    near.fill_diagonal_(False)

    width = int(near.sum(dim=1).max().item()) if near.numel() else 0
    count = features.shape[0]
    # Stable sort puts the neighbours (True) first, in node order.
    order = torch.sort(near.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    valid_others = torch.gather(near, 1, order)
    anchors = torch.arange(count, device=features.device).unsqueeze(1)
    local = torch.cat([anchors, order], dim=1)
    valid = torch.cat([torch.ones_like(anchors, dtype=torch.bool), valid_others], dim=1)
    cosine = (features.unsqueeze(1) * features[local]).sum(dim=-1)
    cosine[:, 0] = 1.0
    return _from_members(local + node_offset, valid, cosine, SPATIAL, temperature)


def semantic_hyperedges(
    concepts: Tensor,
    query: Tensor,
    support: Tensor,
    members: int,
    concept_offset: int,
    support_offset: int,
    temperature: float = 0.1,
) -> Hyperedges:
    """Build one hyperedge per concept: the concept, its ``members`` most similar query
    patches and its ``members`` most similar support patches.

    Args:
        concepts: ``[C, D]`` unit concept embeddings, node ids ``concept_offset + c``.
        query: ``[Nq, D]`` unit query patches, node ids ``0..Nq-1``.
        support: ``[Ns, D]`` unit support patches, node ids ``support_offset + j``.
        members: ``M``, capped at ``Nq`` and ``Ns`` respectively.
        temperature: softmax temperature of the member weights.
    """
    query_cos, query_ids = (concepts @ query.T).topk(min(members, query.shape[0]), dim=1)
    support_cos, support_ids = (concepts @ support.T).topk(min(members, support.shape[0]), dim=1)
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


def _shift_nodes(edges: Hyperedges, offset: int) -> Hyperedges:
    shift = torch.tensor([[offset], [0]], device=edges.index.device)
    return dataclasses.replace(edges, index=edges.index + shift)


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
    concepts = F.normalize(concepts.float(), dim=-1)
    support = bank.features
    nq, ns = query.shape[0], support.shape[0]
    device = query.device
    query_groups = torch.zeros(nq, dtype=torch.long, device=device)

    parts = [
        visual_affinity_hyperedges(query, support, k_neighbors, nq, temperature),
        spatial_hyperedges(
            query, grid_positions(grid_size, device), query_groups, spatial_size, 0, temperature
        ),
        _shift_nodes(bank.spatial, nq),
    ]
    if semantic_edges:
        parts.append(
            semantic_hyperedges(
                concepts, query, support, semantic_members, nq + ns, nq, temperature
            )
        )
    edges = concat_hyperedges(parts)
    if pairwise:
        edges = pairwise_expansion(edges, temperature)

    node_type = torch.cat(
        [
            torch.full((nq,), QUERY, dtype=torch.long, device=device),
            torch.full((ns,), SUPPORT, dtype=torch.long, device=device),
            torch.full((concepts.shape[0],), CONCEPT, dtype=torch.long, device=device),
        ]
    )
    return Hypergraph(x=torch.cat([query, support, concepts]), node_type=node_type, edges=edges)


def batch_hypergraphs(graphs: Sequence[Hypergraph]) -> Hypergraph:
    """Join graphs into one graph of disjoint components (nodes and hyperedges renumbered)."""
    node_offset = 0
    edge_offset = 0
    indices = []
    for graph in graphs:
        offsets = torch.tensor([[node_offset], [edge_offset]], device=graph.edges.index.device)
        indices.append(graph.edges.index + offsets)
        node_offset += graph.x.shape[0]
        edge_offset += graph.edges.num_edges
    edges = Hyperedges(
        index=torch.cat(indices, dim=1),
        weight=torch.cat([graph.edges.weight for graph in graphs]),
        member_weight=torch.cat([graph.edges.member_weight for graph in graphs]),
        member_cosine=torch.cat([graph.edges.member_cosine for graph in graphs]),
        kind=torch.cat([graph.edges.kind for graph in graphs]),
        num_edges=edge_offset,
    )
    return Hypergraph(
        x=torch.cat([graph.x for graph in graphs]),
        node_type=torch.cat([graph.node_type for graph in graphs]),
        edges=edges,
    )
