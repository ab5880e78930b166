"""Hyperedge construction on hand-made inputs with known members and weights."""

import torch
from torch.testing import assert_close

from h2vlr.hypergraph import (
    CONCEPT,
    QUERY,
    SEMANTIC,
    SPATIAL,
    SUPPORT,
    VISUAL,
    batch_hypergraphs,
    build_hyperedges,
    build_hypergraph,
    grid_neighbour_table,
    grid_positions,
    link_concepts,
    make_support_bank,
    pairwise_expansion,
    semantic_hyperedges,
    spatial_hyperedges,
    table_hyperedges,
    visual_affinity_hyperedges,
)


def members_of(edges, edge: int) -> list[int]:
    node, row = edges.index
    return node[row == edge].tolist()


def softmax_weights(cosines: list[float], temperature: float) -> torch.Tensor:
    return torch.softmax(torch.tensor(cosines) / temperature, dim=0)


def test_visual_affinity_members_and_weights():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    support = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    edges = visual_affinity_hyperedges(query, support, k=2, support_offset=2, temperature=0.1)

    assert edges.num_edges == 2
    assert edges.kind.tolist() == [VISUAL, VISUAL]
    assert members_of(edges, 0) == [0, 2, 3]  # query 0, support 0 (cos 1), support 1 (cos 0.6)
    assert members_of(edges, 1) == [1, 4, 3]  # query 1, support 2 (cos 1), support 1 (cos 0.8)
    # Mean of (1 + cos) / 2 over the non-anchor members.
    assert_close(edges.weight, torch.tensor([(1.0 + 0.8) / 2, (1.0 + 0.9) / 2]))
    expected = torch.cat([softmax_weights([1, 1, 0.6], 0.1), softmax_weights([1, 1, 0.8], 0.1)])
    assert_close(edges.member_weight, expected)


def test_visual_affinity_caps_k_at_support_size():
    query = torch.tensor([[1.0, 0.0]])
    support = torch.tensor([[0.0, 1.0]])
    edges = visual_affinity_hyperedges(query, support, k=5, support_offset=1)
    assert members_of(edges, 0) == [0, 1]
    assert_close(edges.weight, torch.tensor([0.5]))


def test_spatial_neighbourhoods_on_3x3_grid():
    features = torch.ones(9, 2) / 2**0.5  # identical unit vectors: every cosine is 1
    positions = grid_positions((3, 3))
    groups = torch.zeros(9, dtype=torch.long)
    edges = spatial_hyperedges(features, positions, groups, size=3, node_offset=10)

    assert edges.num_edges == 9
    assert edges.kind.unique().tolist() == [SPATIAL]
    assert members_of(edges, 0) == [10, 11, 13, 14]  # corner: itself + 3 neighbours
    assert members_of(edges, 4) == [14, 10, 11, 12, 13, 15, 16, 17, 18]  # centre: all 9
    assert members_of(edges, 5) == [15, 11, 12, 14, 17, 18]  # right edge: 6
    assert_close(edges.weight, torch.ones(9))
    node, row = edges.index
    assert_close(edges.member_weight[row == 4], torch.full((9,), 1 / 9))


def test_spatial_respects_images_and_missing_patches():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # Two patches of image 0 at (0, 0) and (0, 1); image 1 keeps (0, 0) and (2, 2) only.
    positions = torch.tensor([[0, 0], [0, 1], [0, 0], [2, 2]])
    groups = torch.tensor([0, 0, 1, 1])
    edges = spatial_hyperedges(features, positions, groups, size=3, node_offset=0)

    assert members_of(edges, 0) == [0, 1]
    assert members_of(edges, 1) == [1, 0]
    assert members_of(edges, 2) == [2]  # its grid neighbour (2, 2) is two rows away
    assert members_of(edges, 3) == [3]
    assert_close(edges.weight, torch.tensor([0.5, 0.5, 1.0, 1.0]))  # cos 0 -> (1 + 0) / 2
    assert_close(edges.member_weight[-2:], torch.ones(2))  # lone anchors weigh 1


def test_spatial_size_one_is_the_patch_alone():
    features = torch.eye(4)
    edges = spatial_hyperedges(
        features, grid_positions((2, 2)), torch.zeros(4, dtype=torch.long), size=1, node_offset=0
    )
    assert edges.index.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_semantic_members_and_weights():
    concepts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    support = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    edges = semantic_hyperedges(
        concepts, query, support, members=1, concept_offset=5, support_offset=3, temperature=0.1
    )

    assert edges.kind.tolist() == [SEMANTIC, SEMANTIC]
    assert members_of(edges, 0) == [5, 0, 3]  # concept 0, query 0 (cos 1), support 0 (cos 0.8)
    assert members_of(edges, 1) == [6, 2, 4]  # concept 1, query 2 (cos 1), support 1 (cos 1)
    assert_close(edges.weight, torch.tensor([(1.0 + 0.9) / 2, 1.0]))
    expected = torch.cat([softmax_weights([1, 1, 0.8], 0.1), softmax_weights([1, 1, 1], 0.1)])
    assert_close(edges.member_weight, expected)


def test_pairwise_expansion_pairs_anchor_with_members():
    query = torch.tensor([[1.0, 0.0]])
    support = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    edges = visual_affinity_hyperedges(query, support, k=2, support_offset=1, temperature=0.1)
    pairs = pairwise_expansion(edges, temperature=0.1)

    assert pairs.num_edges == 2
    assert members_of(pairs, 0) == [0, 1]
    assert members_of(pairs, 1) == [0, 2]
    assert_close(pairs.weight, torch.tensor([1.0, 0.8]))
    assert_close(pairs.member_weight[2:], softmax_weights([1, 0.6], 0.1))
    assert pairs.kind.tolist() == [VISUAL, VISUAL]


def test_build_hypergraph_layout_and_counts():
    torch.manual_seed(0)
    grid = (3, 3)
    query = torch.randn(9, 4)
    bank = make_support_bank(
        torch.randn(18, 4),
        torch.cat([grid_positions(grid)] * 2),
        torch.tensor([0] * 9 + [1] * 9),
        spatial_size=3,
    )
    concepts = torch.randn(2, 4)
    graph = build_hypergraph(
        query, bank, concepts, grid, k_neighbors=2, spatial_size=3, semantic_members=3
    )

    assert graph.x.shape == (29, 4)
    assert graph.node_type.tolist() == [QUERY] * 9 + [SUPPORT] * 18 + [CONCEPT] * 2
    kinds = graph.edges.kind.tolist()
    assert kinds.count(VISUAL) == 9
    assert kinds.count(SPATIAL) == 9 + 18
    assert kinds.count(SEMANTIC) == 2
    assert graph.edges.num_edges == len(kinds) == graph.edges.weight.numel()
    assert int(graph.edges.index[0].max()) < 29
    # Support spatial hyperedges point at support nodes only.
    node, row = graph.edges.index
    support_spatial = row >= 18  # visual (9) and query spatial (9) come first
    support_spatial &= row < 18 + 18
    assert (graph.node_type[node[support_spatial]] == SUPPORT).all()

    without = build_hypergraph(
        query,
        bank,
        concepts,
        grid,
        k_neighbors=2,
        spatial_size=3,
        semantic_members=3,
        semantic_edges=False,
    )
    assert SEMANTIC not in without.edges.kind.tolist()


def test_batch_hypergraphs_renumbers_components():
    query = torch.tensor([[1.0, 0.0]])
    bank = make_support_bank(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 0]]), torch.tensor([0]), spatial_size=1
    )
    concepts = torch.tensor([[1.0, 0.0]])
    graph = build_hypergraph(
        query, bank, concepts, (1, 1), k_neighbors=1, spatial_size=1, semantic_members=1
    )
    batched = batch_hypergraphs([graph, graph])
    count = graph.edges.num_edges

    assert batched.x.shape[0] == 6
    assert batched.edges.num_edges == 2 * count
    second = batched.edges.index[:, batched.edges.index[1] >= count]
    assert_close(second - torch.tensor([[3], [count]]), graph.edges.index)


def test_grid_neighbour_table_matches_spatial_hyperedges():
    torch.manual_seed(0)
    grid = (4, 5)
    features = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1)
    groups = torch.zeros(20, dtype=torch.long)
    local, valid = grid_neighbour_table(grid, 3, torch.device("cpu"))
    # Corner patch 0 has 3 neighbours, inner patch 6 (row 1, column 1) has 8.
    assert local[0, valid[0]].tolist() == [0, 1, 5, 6]
    assert local[6, valid[6]].tolist() == [6, 0, 1, 2, 5, 7, 10, 11, 12]
    from_table = table_hyperedges(features, local, valid, node_offset=4)
    direct = spatial_hyperedges(features, grid_positions(grid), groups, size=3, node_offset=4)
    assert torch.equal(from_table.index, direct.index)
    assert_close(from_table.weight, direct.weight)
    assert_close(from_table.member_weight, direct.member_weight)


def test_build_hyperedges_with_shared_links_matches_build_hypergraph():
    torch.manual_seed(1)
    grid = (3, 3)
    bank = make_support_bank(
        torch.randn(18, 4),
        torch.cat([grid_positions(grid)] * 2),
        torch.tensor([0] * 9 + [1] * 9),
        spatial_size=3,
    )
    concepts = torch.randn(2, 4)
    links = link_concepts(concepts, bank, members=3)
    assert_close(links.concepts.norm(dim=-1), torch.ones(2))
    for query in (torch.randn(9, 4), torch.randn(9, 4)):
        graph = build_hypergraph(
            query, bank, concepts, grid, k_neighbors=2, spatial_size=3, semantic_members=3
        )
        unit = torch.nn.functional.normalize(query, dim=-1)
        edges = build_hyperedges(unit, bank, links, grid, k_neighbors=2, spatial_size=3)
        assert torch.equal(edges.index, graph.edges.index)
        assert torch.equal(edges.kind, graph.edges.kind)
        assert_close(edges.weight, graph.edges.weight)
        assert_close(edges.member_weight, graph.edges.member_weight)
