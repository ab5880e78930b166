"""HypergraphConv against the dense incidence-matrix formula, and the reasoner's contract."""

import torch
from torch.testing import assert_close
from torch_geometric.nn import HypergraphConv

from h2vlr.hypergraph import Hyperedges, Hypergraph
from h2vlr.reasoning import HypergraphReasoner, split_components

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
