"""Network scoring: AUPRC on known cases, direction, the truth reader, the linear baselines."""

from __future__ import annotations

import numpy as np
import pytest

from evoformer.errors import InputError
from evoformer.grn import (
    auprc,
    partial_correlation,
    random_auprc,
    read_network,
    read_truth,
)


def _truth(g: int, edges: list[tuple[int, int]]) -> np.ndarray:
    truth = np.zeros((g, g), dtype=bool)
    for i, j in edges:
        truth[i, j] = True
    return truth


def test_auprc_hand_computed_cases():
    truth = _truth(4, [(0, 1), (2, 3)])  # 2 of the 6 unordered pairs
    scores = np.zeros((4, 4))
    scores[0, 1], scores[0, 2], scores[3, 2] = 0.9, 0.8, 0.7  # ranking: T, F, T, then ties
    # precision at the two true pairs: 1/1 and 2/3, each adding recall 1/2
    assert auprc(scores, truth) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert random_auprc(truth) == pytest.approx(2 / 6)
    perfect = truth.astype(float)
    assert auprc(perfect, truth) == 1.0
    # worst ranking: the 2 true pairs last of 6 -> precision 1/5 and 2/6
    worst = np.ones((4, 4))
    worst[0, 1] = worst[1, 0] = -1.0  # symmetric: a pair scores the larger direction
    worst[2, 3] = worst[3, 2] = -2.0
    assert auprc(worst, truth) == pytest.approx(0.5 / 5 + 0.5 * 2 / 6)
    # tied last: they enter together at one threshold -> precision 2/6 for recall 0 -> 1
    assert auprc(1 - (truth | truth.T), truth) == pytest.approx(2 / 6)
    # all scores tied: one threshold, precision = the positive rate
    assert auprc(np.ones((4, 4)), truth) == pytest.approx(random_auprc(truth))


def test_direction_is_scored_only_when_asked():
    truth = _truth(3, [(0, 1)])
    reversed_scores = np.zeros((3, 3))
    reversed_scores[1, 0] = 1.0  # the edge, the wrong way round
    assert auprc(reversed_scores, truth, symmetric=True) == 1.0
    # directed: 6 ordered pairs; the only true one (0->1) is tied with 4 others at 0, below 1->0
    assert auprc(reversed_scores, truth, symmetric=False) == pytest.approx(1 / 6)
    assert random_auprc(truth, symmetric=False) == pytest.approx(1 / 6)
    assert random_auprc(truth, symmetric=True) == pytest.approx(1 / 3)
    # symmetric: a pair's score is the larger of the two directions
    both = np.zeros((3, 3))
    both[0, 1], both[1, 0], both[1, 2] = 0.1, 0.9, 0.5
    assert auprc(both, truth) == 1.0


def test_diagonal_is_left_out():
    truth = _truth(3, [(0, 1), (1, 1)])
    scores = np.eye(3) * 10
    scores[0, 1] = 1.0
    assert auprc(scores, truth) == 1.0  # symmetric: pairs i < j only
    assert auprc(scores, truth, symmetric=False) == 1.0
    assert random_auprc(truth, symmetric=False) == pytest.approx(1 / 6)
    # with the diagonal: 9 ordered pairs, 2 true; self-loop 1->1 is ranked first, 0->1 next
    assert auprc(scores, truth, exclude_diagonal=False, symmetric=False) < 1.0
    assert random_auprc(truth, exclude_diagonal=False, symmetric=False) == pytest.approx(2 / 9)


def test_random_scores_average_the_positive_rate():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 40)) < 0.05
    values = [auprc(rng.random((40, 40)), truth) for _ in range(200)]
    assert np.mean(values) == pytest.approx(random_auprc(truth), rel=0.15)


def test_auprc_bad_input():
    truth = _truth(3, [(0, 1)])
    with pytest.raises(ValueError, match="shape"):
        auprc(np.zeros((2, 2)), truth)
    with pytest.raises(ValueError, match="NaN"):
        auprc(np.full((3, 3), np.nan), truth)
    with pytest.raises(ValueError, match="no edge"):
        auprc(np.zeros((3, 3)), np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="diagonal"):
        auprc(np.zeros((3, 3)), truth, exclude_diagonal=False, symmetric=True)
    with pytest.raises(ValueError, match="square"):
        random_auprc(np.zeros((2, 3), dtype=bool))


def test_read_network_in_a_given_gene_order(tmp_path):
    path = tmp_path / "net.tsv"
    path.write_text(
        "source\ttarget\tweight\n"
        "a\tb\t1.5\n"
        "c\ta\t-2\n"
        "a\tb\t0.5\n"  # duplicates add up
        "a\tzzz\t3\n"  # a gene not in the order: dropped
    )
    order = ["c", "b", "a"]
    w = read_network(path, order)
    expected = np.zeros((3, 3))
    expected[2, 1] = 2.0  # a -> b
    expected[0, 2] = -2.0  # c -> a
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(read_truth(path, order), expected != 0)
    # without a weight column every edge counts 1
    plain = tmp_path / "plain.tsv"
    plain.write_text("source\ttarget\nb\tc\n")
    assert read_network(plain, order)[1, 0] == 1.0
    assert read_truth(plain, ["b"]).shape == (1, 1) and not read_truth(plain, ["b"]).any()


def test_read_network_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_network(tmp_path / "missing.tsv", ["a"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("from\tto\na\tb\n")
    with pytest.raises(InputError, match=r"bad\.tsv: network has no 'source' column"):
        read_truth(bad, ["a", "b"])
    bad.write_text("source\ttarget\tweight\na\tb\tstrong\n")
    with pytest.raises(InputError, match=r"'weight' row 2 is not a finite number: 'strong'"):
        read_network(bad, ["a", "b"])


def test_partial_correlation_of_a_gaussian_chain():
    # x0 -> x1 -> x2: x0 and x2 are correlated but independent given x1
    rng = np.random.default_rng(0)
    n = 20_000
    x0 = rng.normal(size=n)
    x1 = x0 + rng.normal(size=n)
    x2 = x1 + rng.normal(size=n)
    x = np.stack([x0, x1, x2], axis=1)
    assert np.corrcoef(x, rowvar=False)[0, 2] > 0.5
    pcor = partial_correlation(x, shrinkage=1e-6)
    # the precision matrix is [[2, -1, 0], [-1, 2, -1], [0, -1, 1]]
    expected = np.array([[1, 1 / 2, 0], [1 / 2, 1, 1 / np.sqrt(2)], [0, 1 / np.sqrt(2), 1]])
    np.testing.assert_allclose(pcor, expected, atol=0.02)
    np.testing.assert_allclose(pcor, pcor.T)
    np.testing.assert_array_equal(np.diag(pcor), 1.0)
    # a constant column: no partial correlation with anything
    with_const = np.concatenate([x, np.ones((n, 1))], axis=1)
    assert np.all(partial_correlation(with_const)[3, :3] == 0)
    with pytest.raises(ValueError, match="shrinkage"):
        partial_correlation(x, shrinkage=0)
