"""Spatial contiguity of salient interactions, against brute force and closed forms."""

import itertools
import math

import numpy as np
import pytest

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import and_interactions, knowledge_report, reconstruct_and
from pretrain_reuse.knowledge.contiguity import (
    contiguity,
    contiguous_coalitions,
    player_adjacency,
)
from pretrain_reuse.knowledge.games import grid_players


def _bfs_connected(adjacency: np.ndarray, players: list[int]) -> bool:
    """The reference: a breadth-first search inside the coalition."""
    if not players:
        return False
    seen, todo = {players[0]}, [players[0]]
    while todo:
        u = todo.pop()
        for v in players:
            if adjacency[u, v] and v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(players)


def _grid_adjacency(rows: int, cols: int) -> np.ndarray:
    """Cells r*cols + c, adjacent when they share an edge."""
    a = np.zeros((rows * cols, rows * cols), bool)
    for r, c in itertools.product(range(rows), range(cols)):
        for dr, dc in ((0, 1), (1, 0)):
            if r + dr < rows and c + dc < cols:
                a[r * cols + c, (r + dr) * cols + c + dc] = True
    return a | a.T


@pytest.mark.parametrize("size, grid", [((32, 32), (3, 3)), ((30, 41), (4, 5)), ((9, 9), (1, 4))])
def test_grid_cells_are_adjacent_exactly_when_they_share_an_edge(size, grid):
    # cells of unequal widths (32 px into 3) included; corner-touching cells are not neighbours
    masks = grid_players(size, grid).masks
    np.testing.assert_array_equal(player_adjacency(masks), _grid_adjacency(*grid))


def test_players_apart_are_not_adjacent_and_overlapping_ones_are():
    m = np.zeros((3, 8, 8), bool)
    m[0, 0:2, 0:2] = True
    m[1, 0:2, 3:5] = True  # one empty column between 0 and 1
    m[2, 1:4, 4:6] = True  # overlaps 1
    np.testing.assert_array_equal(player_adjacency(m), [[0, 0, 0], [0, 0, 1], [0, 1, 0]])


@pytest.mark.parametrize("seed", range(6))
def test_contiguous_coalitions_equal_a_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    a = np.triu(rng.random((n, n)) < rng.uniform(0.1, 0.6), 1)
    a = a | a.T
    got = contiguous_coalitions(a)
    want = [_bfs_connected(a, [i for i in range(n) if s >> i & 1]) for s in range(1 << n)]
    np.testing.assert_array_equal(got, want)


def test_counts_of_contiguous_coalitions_match_closed_forms():
    # a path of n players has n - k + 1 connected k-sets; a 3x3 grid has 12 dominoes and 22
    # trominoes (6 straight, 16 L-shaped); one isolated player joins nothing
    n = 7
    path = np.eye(n, k=1, dtype=bool) | np.eye(n, k=-1, dtype=bool)
    order = np.array([s.bit_count() for s in range(1 << n)])
    got = contiguous_coalitions(path)
    assert [int(got[order == k].sum()) for k in range(n + 1)] == [0, *(n - k + 1 for k in range(1, n + 1))]
    order9 = np.array([s.bit_count() for s in range(1 << 9)])
    grid = contiguous_coalitions(_grid_adjacency(3, 3))
    assert int(grid[order9 == 2].sum()) == 12 and int(grid[order9 == 3].sum()) == 22
    assert grid[(1 << 9) - 1]
    apart = _grid_adjacency(3, 3)
    apart[4, :] = apart[:, 4] = False  # the centre cell cut off
    assert not contiguous_coalitions(apart)[(1 << 9) - 1]


def _game(terms: list[int], n: int) -> np.ndarray:
    """A game whose AND interactions are 1 on ``terms`` and 0 elsewhere."""
    i = np.zeros(1 << n)
    i[terms] = 1.0
    return reconstruct_and(i)


def test_contiguity_of_planted_sets_against_the_hand_count():
    # 3x3 grid, players r*3 + c. Pre-trained: {0,1} (adjacent), {0,8} (apart), {3,4,5} (a row);
    # fine-tuned keeps {0,1} and {0,8} and adds {2,5} (adjacent) and {4} (order 1: not counted)
    a = _grid_adjacency(3, 3)
    pre = and_interactions(_game([0b11, 0b100000001, 0b111000], 9))
    ft = and_interactions(_game([0b11, 0b100000001, 0b100100, 0b10000], 9))
    report = knowledge_report(pre * 2, ft * 2, tau=0.05)
    result = contiguity(report, [a, a])
    pairs, triples = 12 / 36, 22 / 84
    d = result.to_dict()
    assert d["preserve"]["items"] == 4  # two pairs per sample
    assert d["preserve"]["contiguous_share"] == pytest.approx(0.5)
    assert d["preserve"]["chance_share"] == pytest.approx(pairs)
    assert d["preserve"]["enrichment"] == pytest.approx(0.5 / pairs)
    z = (2 - 4 * pairs) / math.sqrt(4 * pairs * (1 - pairs))
    assert d["preserve"]["z"] == pytest.approx(z)
    assert d["discard"]["contiguous_share"] == 1.0
    assert d["discard"]["chance_share"] == pytest.approx(triples)
    assert d["new"]["items"] == 2 and d["new"]["contiguous_share"] == 1.0
    assert "exclusive" not in d  # no scratch model
    assert result.share("new") == 1.0 and "Contiguity(samples=2" in repr(result)


def test_a_set_without_items_of_order_two_is_undefined_not_zero():
    a = _grid_adjacency(2, 2)
    x = and_interactions(_game([0b1, 0b10], 4))
    d = contiguity(knowledge_report(x, x, x, tau=0.05), [a]).to_dict()
    assert d["preserve"] == {"items": 0, "contiguous_share": None, "chance_share": None,
                             "enrichment": None, "z": None}
    assert set(d) == {"preserve", "discard", "new", "exclusive"}


def test_inputs_that_do_not_fit_are_one_line():
    x = and_interactions(_game([0b11], 4))
    report = knowledge_report(x, x, tau=0.05)
    with pytest.raises(PretrainReuseError, match="got 2 adjacency matrices for a report of 1 samples"):
        contiguity(report, [np.zeros((4, 4), bool)] * 2)
    with pytest.raises(PretrainReuseError, match=r"adjacency\[0\] has shape \(3, 3\) but sample 0 has 4"):
        contiguity(report, [np.zeros((3, 3), bool)])
    with pytest.raises(PretrainReuseError, match="symmetric with a False diagonal"):
        contiguous_coalitions(np.eye(3, k=1, dtype=bool))
    with pytest.raises(PretrainReuseError, match="must be a KnowledgeReport"):
        contiguity([x], [np.zeros((4, 4), bool)])
    with pytest.raises(PretrainReuseError, match=r"\(n, H, W\) player masks"):
        player_adjacency(np.ones((4, 4), bool))
