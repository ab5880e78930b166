"""High-order structural reasoning: per-type projections, then hypergraph convolutions.

Shapes: ``V`` nodes, ``D`` input width (the joint image-text width), ``H`` hidden width,
``E`` hyperedges, ``nnz`` node-hyperedge memberships.

Each layer computes ``h <- LayerNorm(h + GELU(HypergraphConv(h)))``. torch_geometric's
``HypergraphConv`` (2.8) computes ``D^-1 H B^-1 H^T X Theta + bias`` where ``D`` is the
node degree weighted by the hyperedge weights and ``B`` the hyperedge size: the hyperedge
weights enter only through ``D``. In attention mode the hyperedge features are the
member-weighted means of the node features, so the similarity weights steer attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import HypergraphConv

from h2vlr.hypergraph import (
    CONCEPT,
    QUERY,
    SUPPORT,
    ConceptLinks,
    Hyperedges,
    Hypergraph,
    SupportBank,
    batch_hyperedges,
    build_hyperedges,
    link_concepts,
)

NUM_NODE_TYPES = 3  # query patch, support patch, concept
# Memberships per HypergraphConv call, so that the convolution's [nnz, H] float buffers
# stay within a few MiB. In a CPU measurement at H = 128, one call over 32 components of
# about 10,000 memberships each ran two to three times slower than one call per component.
CHUNK_MEMBERSHIPS = 16_384


class HypergraphReasoner(nn.Module):
    """Type-aware projection followed by ``num_layers`` residual hypergraph convolutions.

    The projections start as the identity when ``hidden_dim == in_dim``, so an untrained
    reasoner keeps the CLIP geometry up to the convolutions and layer norms.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, num_layers: int, attention: bool = False
    ) -> None:
        super().__init__()
        self.attention = attention
        self.projections = nn.ModuleList(
            nn.Linear(in_dim, hidden_dim) for _ in range(NUM_NODE_TYPES)
        )
        self.type_embedding = nn.Embedding(NUM_NODE_TYPES, hidden_dim)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        if hidden_dim == in_dim:
            for projection in self.projections:
                nn.init.eye_(projection.weight)
                nn.init.zeros_(projection.bias)
        self.convs = nn.ModuleList(
            HypergraphConv(hidden_dim, hidden_dim, use_attention=attention)
            for _ in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers))

    def project(self, x: Tensor, node_type: Tensor) -> Tensor:
        """Map ``[V, D]`` nodes to ``[V, H]`` with their type's projection and embedding."""
        out = x.new_zeros(x.shape[0], self.type_embedding.embedding_dim)
        for kind, projection in enumerate(self.projections):
            rows = node_type == kind
            out[rows] = projection(x[rows])
        return out + self.type_embedding(node_type)

    def project_as(self, x: Tensor, kind: int) -> Tensor:
        """Map ``[..., D]`` nodes that all have type ``kind`` to ``[..., H]``; equal to
        ``project`` on those rows."""
        return self.projections[kind](x) + self.type_embedding.weight[kind]

    def forward(self, graph: Hypergraph) -> Tensor:
        """Refine the nodes of ``graph``; returns ``[V, H]``."""
        return self.convolve(self.project(graph.x, graph.node_type), graph.edges)

    def convolve(self, h: Tensor, edges: Hyperedges) -> Tensor:
        """Run the convolution layers on projected ``[V, H]`` nodes; returns ``[V, H]``."""
        for conv, norm in zip(self.convs, self.norms, strict=True):
            attr = _hyperedge_features(h, edges) if self.attention else None
            # NOTE: HypergraphConv (torch_geometric 2.8) uses hyperedge_weight only in the
            # node degree D, so without attention the weights do not rescale messages.
            update = conv(
                h,
                edges.index,
                hyperedge_weight=edges.weight,
                hyperedge_attr=attr,
                num_edges=edges.num_edges,
            )
            h = norm(h + F.gelu(update))
        return h


def _hyperedge_features(h: Tensor, edges: Hyperedges) -> Tensor:
    """Member-weighted mean of the node features of each hyperedge: ``[E, H]``."""
    node, edge = edges.index
    weighted = h[node] * edges.member_weight.unsqueeze(1)
    out = h.new_zeros(edges.num_edges, h.shape[1])
    return out.index_add(0, edge, weighted)


def split_components(
    h: Tensor, sizes: tuple[int, int, int], count: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Split the refined nodes of ``count`` equal components into their three node groups.

    Args:
        h: ``[count * (Nq + Ns + C), H]`` nodes in the order of ``batch_hypergraphs``.
        sizes: ``(Nq, Ns, C)`` of each component.
        count: number of components.

    Returns:
        query ``[count, Nq, H]``, support ``[count, Ns, H]``, concepts ``[count, C, H]``.
    """
    per_component = h.reshape(count, sum(sizes), h.shape[-1])
    query, support, concepts = torch.split(per_component, list(sizes), dim=1)
    return query, support, concepts


@dataclass(frozen=True)
class RefinedNodes:
    """Node features after reasoning, one component per (image, feature layer)."""

    query: Tensor  # [B, L, N, H]
    support: Tensor  # [B, L, Ns, H]
    concepts: Tensor  # [B, L, C, H]


@dataclass(frozen=True)
class GraphSettings:
    """Hyperedge settings taken from the method config."""

    k_neighbors: int  # K
    spatial_size: int  # r
    semantic_members: int  # M
    semantic_edges: bool  # add concept hyperedges
    pairwise: bool  # 2-node edges instead of hyperedges
    temperature: float  # member-weight softmax temperature


def component_chunks(parts: Sequence[Hyperedges], budget: int) -> list[slice]:
    """Group consecutive components into runs of at most ``budget`` memberships; a
    component larger than the budget gets a run of its own."""
    chunks: list[slice] = []
    start, total = 0, 0
    for index, part in enumerate(parts):
        size = part.index.shape[1]
        if index > start and total + size > budget:
            chunks.append(slice(start, index))
            start, total = index, 0
        total += size
    if parts:
        chunks.append(slice(start, len(parts)))
    return chunks


@dataclass(frozen=True)
class SupportContext:
    """Query-independent part of every query image's graphs: the concepts' links to each
    support bank and the projected support and concept nodes. It stays valid while the
    reasoner's parameters, the banks and the concepts are unchanged."""

    links: list[ConceptLinks]  # one per feature layer
    support: Tensor  # [L, Ns, H] projected support nodes
    concepts: Tensor  # [C, H] projected concept nodes


def support_context(
    reasoner: HypergraphReasoner,
    banks: Sequence[SupportBank],
    concepts: Tensor,
    settings: GraphSettings,
) -> SupportContext:
    """Compute the query-independent part of the graphs once.

    Args:
        reasoner: the reasoner whose projections are applied.
        banks: one support bank per feature layer, each with the same ``Ns``.
        concepts: ``[C, D]`` concept embeddings, shared by every layer.
        settings: hyperedge settings.
    """
    links = [link_concepts(concepts, bank, settings.semantic_members) for bank in banks]
    support = torch.stack([bank.features for bank in banks])  # [L, Ns, D]
    return SupportContext(
        links=links,
        support=reasoner.project_as(support, SUPPORT),
        concepts=reasoner.project_as(links[0].concepts, CONCEPT),
    )


def refine(
    reasoner: HypergraphReasoner | None,
    query_tokens: Tensor,
    banks: Sequence[SupportBank],
    concepts: Tensor,
    grid_size: tuple[int, int],
    settings: GraphSettings,
    context: SupportContext | None = None,
) -> RefinedNodes:
    """Build one hypergraph per (image, layer), refine them, split the nodes back.

    Components are disjoint, so an image's scores do not depend on the other images of
    the batch. Consecutive components share a convolution call up to
    ``CHUNK_MEMBERSHIPS`` memberships. Without a reasoner the unit raw features are returned (no graph is built).

    Args:
        reasoner: the trained reasoner, or None for the ``no-hsr`` variant.
        query_tokens: ``[B, L, N, D]`` patch tokens of the query images.
        banks: one support bank per feature layer, each with the same ``Ns``.
        concepts: ``[C, D]`` concept embeddings, shared by every layer.
        grid_size: ``(gh, gw)`` with ``gh * gw == N``.
        settings: hyperedge settings.
        context: ``support_context`` of the same reasoner, banks, concepts and settings,
            to reuse across calls; computed here when None.
    """
    count, layers, patches, _ = query_tokens.shape
    if reasoner is None:
        return _raw_nodes(query_tokens, banks, concepts)
    if context is None:
        context = support_context(reasoner, banks, concepts, settings)

    query = F.normalize(query_tokens.float(), dim=-1)  # [B, L, N, D]
    parts = [
        build_hyperedges(
            query[image, layer],
            banks[layer],
            context.links[layer] if settings.semantic_edges else None,
            grid_size,
            k_neighbors=settings.k_neighbors,
            spatial_size=settings.spatial_size,
            pairwise=settings.pairwise,
            temperature=settings.temperature,
        )
        for image in range(count)
        for layer in range(layers)
    ]
    sizes = (patches, context.support.shape[1], context.concepts.shape[0])
    projected = torch.cat(
        [
            reasoner.project_as(query, QUERY),
            context.support.expand(count, -1, -1, -1),
            context.concepts.expand(count, layers, -1, -1),
        ],
        dim=2,
    ).flatten(0, 1)  # [B * L, N + Ns + C, H], one row per component
    hidden = torch.cat(
        [
            reasoner.convolve(
                projected[chunk].flatten(0, 1),
                batch_hyperedges(parts[chunk], [sum(sizes)] * len(parts[chunk])),
            )
            for chunk in component_chunks(parts, CHUNK_MEMBERSHIPS)
        ]
    )
    query_nodes, support, concept_nodes = split_components(hidden, sizes, count * layers)
    return RefinedNodes(
        query=query_nodes.reshape(count, layers, *query_nodes.shape[1:]),
        support=support.reshape(count, layers, *support.shape[1:]),
        concepts=concept_nodes.reshape(count, layers, *concept_nodes.shape[1:]),
    )


def _raw_nodes(
    query_tokens: Tensor, banks: Sequence[SupportBank], concepts: Tensor
) -> RefinedNodes:
    count, layers = query_tokens.shape[:2]
    support = torch.stack([bank.features for bank in banks])  # [L, Ns, D]
    unit_concepts = F.normalize(concepts.float(), dim=-1)
    return RefinedNodes(
        query=F.normalize(query_tokens.float(), dim=-1),
        support=support.unsqueeze(0).expand(count, -1, -1, -1),
        concepts=unit_concepts.expand(count, layers, -1, -1),
    )
