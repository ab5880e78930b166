"""HypergraphConv against the dense incidence-matrix formula, and the reasoner's contract."""

import torch
from torch.testing import assert_close
from torch_geometric.nn import HypergraphConv

import h2vlr.reasoning as reasoning
from h2vlr.hypergraph import (
    Hyperedges,
    Hypergraph,
    batch_hypergraphs,
    build_hypergraph,
    grid_positions,
    make_support_bank,
)
from h2vlr.reasoning import (
    GraphSettings,
    HypergraphReasoner,
    component_chunks,
    refine,
    split_components,
    support_context,
)

# Nodes {0, 1, 2, 3, 4}; hyperedges {0, 1, 2}, {1, 3, 4}, {2}.
INDEX = torch.tensor([[0, 1, 2, 1, 3, 4, 2], [0, 0, 0, 1, 1, 1, 2]])


def incidence_matrix() -> torch.Tensor:
    incidence = torch.zeros(5, 3)
    incidence[INDEX[0], INDEX[1]] = 1.0
    return incidence


def make_conv(seed: int = 0) -> HypergraphConv:
    torch.manual_seed(seed)
    conv = HypergraphConv(3, 4)
    torch.nn.init.normal_(conv.bias)
    return conv


def test_hypergraph_conv_matches_dense_formula_unit_weights():
    conv = make_conv()
    x = torch.randn(5, 3)
    h = incidence_matrix()
    w = torch.ones(3)
    degree_inv = torch.diag(1.0 / (h @ w))
    size_inv = torch.diag(1.0 / h.sum(dim=0))
    theta = conv.lin.weight.T

    # X' = D^-1 H W B^-1 H^T X Theta + b with W = I.
    expected = degree_inv @ h @ torch.diag(w) @ size_inv @ h.T @ x @ theta + conv.bias
    out = conv(x, INDEX, hyperedge_weight=w, num_edges=3)
    assert_close(out, expected)


def test_hypergraph_conv_applies_weights_in_node_degree_only():
    # torch_geometric 2.8 uses the hyperedge weights for D (weighted node degree) but does
    # not multiply the messages by W; the reasoner's documentation relies on this.
    conv = make_conv(1)
    x = torch.randn(5, 3)
    h = incidence_matrix()
    w = torch.tensor([0.5, 2.0, 1.0])
    degree_inv = torch.diag(1.0 / (h @ w))
    size_inv = torch.diag(1.0 / h.sum(dim=0))
    theta = conv.lin.weight.T

    expected = degree_inv @ h @ size_inv @ h.T @ x @ theta + conv.bias
    out = conv(x, INDEX, hyperedge_weight=w, num_edges=3)
    assert_close(out, expected)
    with_w = degree_inv @ h @ torch.diag(w) @ size_inv @ h.T @ x @ theta + conv.bias
    assert not torch.allclose(out, with_w)


def tiny_graph(dim: int = 6) -> Hypergraph:
    torch.manual_seed(2)
    edges = Hyperedges(
        index=INDEX,
        weight=torch.tensor([0.9, 0.7, 1.0]),
        member_weight=torch.tensor([0.5, 0.25, 0.25, 0.4, 0.3, 0.3, 1.0]),
        member_cosine=torch.tensor([1.0, 0.5, 0.5, 1.0, 0.2, 0.2, 1.0]),
        kind=torch.tensor([0, 1, 2]),
        num_edges=3,
    )
    return Hypergraph(x=torch.randn(5, dim), node_type=torch.tensor([0, 0, 1, 1, 2]), edges=edges)


def test_reasoner_shapes_and_finite_values():
    graph = tiny_graph()
    for attention in (False, True):
        torch.manual_seed(0)
        reasoner = HypergraphReasoner(6, 8, num_layers=2, attention=attention)
        out = reasoner(graph)
        assert out.shape == (5, 8)
        assert torch.isfinite(out).all()


def test_reasoner_without_layers_is_type_projection():
    graph = tiny_graph()
    torch.manual_seed(0)
    reasoner = HypergraphReasoner(6, 6, num_layers=0)
    # Projections start as the identity, so only the type embedding is added.
    expected = graph.x + reasoner.type_embedding(graph.node_type)
    assert_close(reasoner(graph), expected)


def test_reasoner_gradients_reach_every_parameter():
    graph = tiny_graph()
    torch.manual_seed(0)
    reasoner = HypergraphReasoner(6, 6, num_layers=2, attention=True)
    reasoner(graph).square().sum().backward()
    for name, parameter in reasoner.named_parameters():
        assert parameter.grad is not None, name


def test_split_components_orders_node_groups():
    h = torch.arange(2 * 6, dtype=torch.float32).unsqueeze(1)  # two components of 3 + 2 + 1
    query, support, concepts = split_components(h, (3, 2, 1), count=2)
    assert query.squeeze(-1).tolist() == [[0, 1, 2], [6, 7, 8]]
    assert support.squeeze(-1).tolist() == [[3, 4], [9, 10]]
    assert concepts.squeeze(-1).tolist() == [[5], [11]]


def test_project_as_matches_project():
    graph = tiny_graph()
    torch.manual_seed(0)
    reasoner = HypergraphReasoner(6, 8, num_layers=1)
    projected = reasoner.project(graph.x, graph.node_type)
    for kind in range(3):
        rows = graph.node_type == kind
        assert_close(reasoner.project_as(graph.x[rows], kind), projected[rows])


def test_component_chunks_respect_the_budget():
    parts = [one_hyperedge(size) for size in (4, 4, 9, 1, 1)]
    chunks = component_chunks(parts, budget=8)
    # 4 + 4 fit; 9 exceeds the budget alone; 1 + 1 fit.
    assert [(chunk.start, chunk.stop) for chunk in chunks] == [(0, 2), (2, 3), (3, 5)]
    assert component_chunks([], budget=8) == []


def one_hyperedge(size: int) -> Hyperedges:
    """One hyperedge of ``size`` members (node 0 repeated; only the count matters)."""
    return Hyperedges(
        index=torch.zeros(2, size, dtype=torch.long),
        weight=torch.ones(1),
        member_weight=torch.full((size,), 1.0 / size),
        member_cosine=torch.ones(size),
        kind=torch.zeros(1, dtype=torch.long),
        num_edges=1,
    )


SETTINGS = GraphSettings(
    k_neighbors=2,
    spatial_size=3,
    semantic_members=3,
    semantic_edges=True,
    pairwise=False,
    temperature=0.1,
)


def reference_refine(reasoner, tokens, banks, concepts, grid, settings):
    """One graph of every (image, layer) component, refined in a single call."""
    graphs = [
        build_hypergraph(
            tokens[image, layer],
            banks[layer],
            concepts,
            grid,
            k_neighbors=settings.k_neighbors,
            spatial_size=settings.spatial_size,
            semantic_members=settings.semantic_members,
            semantic_edges=settings.semantic_edges,
            pairwise=settings.pairwise,
            temperature=settings.temperature,
        )
        for image in range(tokens.shape[0])
        for layer in range(tokens.shape[1])
    ]
    hidden = reasoner(batch_hypergraphs(graphs))
    sizes = (tokens.shape[2], banks[0].features.shape[0], concepts.shape[0])
    return split_components(hidden, sizes, len(graphs))


def small_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grid = (3, 3)
    banks = [
        make_support_bank(
            torch.randn(18, 6, generator=generator),
            torch.cat([grid_positions(grid)] * 2),
            torch.tensor([0] * 9 + [1] * 9),
            spatial_size=3,
        )
        for _ in range(2)
    ]
    tokens = torch.randn(3, 2, 9, 6, generator=generator)  # 3 images, 2 layers
    concepts = torch.randn(4, 6, generator=generator)
    return tokens, banks, concepts, grid


def test_refine_chunks_match_single_graph(monkeypatch):
    tokens, banks, concepts, grid = small_problem()
    for attention in (False, True):
        torch.manual_seed(0)
        reasoner = HypergraphReasoner(6, 8, num_layers=2, attention=attention)
        expected = reference_refine(reasoner, tokens, banks, concepts, grid, SETTINGS)
        for budget in (1, 150, 10**6):  # one component per call, a few, all of them
            monkeypatch.setattr(reasoning, "CHUNK_MEMBERSHIPS", budget)
            refined = refine(reasoner, tokens, banks, concepts, grid, SETTINGS)
            for got, want in zip(
                (refined.query, refined.support, refined.concepts), expected, strict=True
            ):
                assert_close(got.flatten(0, 1), want, atol=1e-6, rtol=1e-5)


def test_refine_reuses_a_support_context():
    tokens, banks, concepts, grid = small_problem(1)
    torch.manual_seed(0)
    reasoner = HypergraphReasoner(6, 8, num_layers=2)
    context = support_context(reasoner, banks, concepts, SETTINGS)
    shared = refine(reasoner, tokens, banks, concepts, grid, SETTINGS, context)
    fresh = refine(reasoner, tokens, banks, concepts, grid, SETTINGS)
    assert torch.equal(shared.query, fresh.query)
    assert torch.equal(shared.support, fresh.support)
    # Each image alone gives the rows it had in the batch.
    alone = refine(reasoner, tokens[1:2], banks, concepts, grid, SETTINGS, context)
    assert_close(alone.query[0], shared.query[1], atol=1e-6, rtol=1e-5)


def test_refine_passes_gradients_through_the_context():
    tokens, banks, concepts, grid = small_problem(2)
    torch.manual_seed(0)
    reasoner = HypergraphReasoner(6, 6, num_layers=1)
    concepts = concepts.clone().requires_grad_(True)
    refined = refine(reasoner, tokens, banks, concepts, grid, SETTINGS)
    refined.concepts.square().sum().backward()
    assert concepts.grad is not None and concepts.grad.abs().sum() > 0
    for name, parameter in reasoner.named_parameters():
        assert parameter.grad is not None, name
