"""Channel importance and the consumer refit (fx_sparsify/methods/channel_importance.py) on small layers.

The refit is checked against a direct least-squares solve (torch.linalg.lstsq of the augmented
problem); the OBS errors against a brute-force refit of every removal; FLAP's fluctuation against
its formula written out with torch.var.
"""

from __future__ import annotations

import math

import pytest
import torch

from fx_sparsify.methods.channel_importance import (
    ConsumerStats,
    GroupStats,
    activation_scores,
    corrected_weight,
    get_channel_importance,
    obs_greedy,
    obs_scores,
    refit,
    register_channel_importance,
)

F64 = torch.float64


def _data(rows: int = 300, n: int = 8, out: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs with non-zero means (so the bias matters), a weight, a bias."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n) + torch.eye(n, dtype=F64)
    x = torch.randn(rows, n, generator=g, dtype=F64) @ mix + 2 * torch.randn(n, generator=g, dtype=F64)
    return x, torch.randn(out, n, generator=g, dtype=F64), torch.randn(out, generator=g, dtype=F64)


def _stats(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, width: int = 1) -> ConsumerStats:
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return ConsumerStats("fc", w, b, xa.T @ xa, torch.arange(x.shape[1]).reshape(-1, width))


def _error(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, keep: torch.Tensor, width: int = 1) -> float:
    """Mean squared output error of the damp-0 refit with ``keep`` (by units of ``width`` columns)."""
    c = _stats(x, w, b, width)
    w2, b2 = refit(c, keep, 0.0)
    y = x @ w.T + (0 if b is None else b)
    y2 = x @ w2.T + (0 if b2 is None else b2)
    return float((y - y2).square().sum() / x.shape[0])


@pytest.mark.parametrize("bias", [True, False])
def test_refit_equals_direct_least_squares(bias: bool) -> None:
    x, w, b = _data()
    b = b if bias else None
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    w2, b2 = refit(_stats(x, w, b), keep, 0.0)
    y = x @ w.T + (0 if b is None else b)
    a = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=F64)], 1) if bias else x[:, keep]
    sol = torch.linalg.lstsq(a, y).solution
    assert torch.allclose(w2[:, keep], sol[: int(keep.sum())].T, atol=1e-10)
    assert bool((w2[:, ~keep] == 0).all())
    if bias:
        assert b2 is not None and torch.allclose(b2, sol[-1], atol=1e-10)
    else:
        assert b2 is None


def test_damped_refit_is_the_ridge_minimiser() -> None:
    """damp > 0: the exact minimiser of Σ‖Wx + b − W'x_S − b'‖²/rows + λ‖W_S − W'‖² (bias not penalised)."""
    x, w, b = _data()
    keep = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    damp, rows, k = 0.3, x.shape[0], int(keep.sum())
    lam = damp * float(x.square().mean(0).mean())
    a = torch.cat(
        [
            torch.cat([x[:, keep], torch.ones(rows, 1, dtype=F64)], 1) / math.sqrt(rows),
            torch.cat([math.sqrt(lam) * torch.eye(k, dtype=F64), torch.zeros(k, 1, dtype=F64)], 1),
        ]
    )
    y = torch.cat([(x @ w.T + b) / math.sqrt(rows), math.sqrt(lam) * w[:, keep].T])
    sol = torch.linalg.lstsq(a, y).solution
    w2, b2 = refit(_stats(x, w, b), keep, damp)
    assert torch.allclose(w2[:, keep], sol[:k].T, atol=1e-10)
    assert b2 is not None and torch.allclose(b2, sol[-1], atol=1e-10)


def test_refit_keeps_dtype_and_moves_the_removed_mean_into_the_bias() -> None:
    """FLAP's compensation is the special case of independent inputs: a constant input column removed
    adds its contribution to the bias exactly, the other columns unchanged."""
    x, w, b = _data()
    x[:, 3] = 1.5
    keep = torch.ones(8, dtype=torch.bool)
    keep[3] = False
    w2, b2 = refit(_stats(x.float(), w.float(), b.float()), keep, 0.0)
    assert w2.dtype == torch.float32 and b2 is not None and b2.dtype == torch.float32
    assert torch.allclose(b2.double(), b + 1.5 * w[:, 3], atol=1e-3)
    assert torch.allclose(w2[:, keep].double(), w[:, keep], atol=1e-3)


def test_activation_scores_are_flap_fluctuation() -> None:
    x, w, b = _data()
    group = GroupStats(8, [_stats(x, w, b)], w.norm(dim=0))
    expected = x.var(0, unbiased=False) * w.square().sum(0)
    assert torch.allclose(activation_scores(group), expected, rtol=1e-9)
    # two consumers of the same channels (a residual add): their terms add; heads sum their columns
    group2 = GroupStats(4, [_stats(x, w, b, 2), _stats(x, 2 * w, b, 2)], torch.ones(4))
    assert torch.allclose(activation_scores(group2), 5 * expected.reshape(4, 2).sum(1), rtol=1e-9)


@pytest.mark.parametrize("width,bias", [(1, True), (1, False), (2, True)])
def test_obs_greedy_errors_match_brute_force(width: int, bias: bool) -> None:
    """Each greedy step removes the unit whose refit error is least given the earlier removals, and its
    claimed added error is exactly the increase of the refit error."""
    x, w, b = _data()
    b = b if bias else None
    units = 8 // width
    group = GroupStats(units, [_stats(x, w, b, width)], torch.ones(units), damp=0.0)
    order, added = obs_greedy(group, units - 1)
    removed: list[int] = []
    before = 0.0
    for u, a in zip(order, added):
        candidates = {}
        for v in set(range(units)) - set(removed):
            keep = torch.ones(units, dtype=torch.bool)
            keep[removed + [v]] = False
            candidates[v] = _error(x, w, b, keep, width)
        assert u == min(candidates, key=candidates.__getitem__)
        assert a == pytest.approx(candidates[u] - before, rel=1e-6, abs=1e-9)
        removed.append(u)
        before = candidates[u]


def test_obs_blocked_claims_the_exact_joint_error() -> None:
    x, w, b = _data(n=12)
    group = GroupStats(12, [_stats(x, w, b)], torch.ones(12), damp=0.0, block=4)
    order, added = obs_greedy(group, 8)
    for step in range(2):
        keep = torch.ones(12, dtype=torch.bool)
        keep[order[: 4 * (step + 1)]] = False
        assert sum(added[: 4 * (step + 1)]) == pytest.approx(_error(x, w, b, keep), rel=1e-6)


def test_obs_scores_keep_what_greedy_keeps_and_multiple_consumers_add() -> None:
    x, w, b = _data()
    x2, w2, b2 = _data(seed=1)
    consumers = [_stats(x, w, b), _stats(x2, w2, b2)]
    group = GroupStats(8, consumers, torch.ones(8), pruned=3, damp=0.0)
    scores = obs_scores(group)
    order, _ = obs_greedy(group, 3)
    assert set(torch.argsort(scores)[:3].tolist()) == set(order)
    # the first removal minimises the summed error of both consumers
    sums = {}
    for v in range(8):
        keep = torch.ones(8, dtype=torch.bool)
        keep[v] = False
        sums[v] = _error(x, w, b, keep) + _error(x2, w2, b2, keep)
    assert order[0] == min(sums, key=sums.__getitem__)


def test_obs_beats_activation_on_correlated_inputs() -> None:
    """A duplicated input column has high variance but is redundant: OBS removes it, FLAP keeps it."""
    x, w, b = _data()
    x[:, 4] *= 3
    x[:, 5] = x[:, 4]
    group = GroupStats(8, [_stats(x, w, b)], torch.ones(8), pruned=1, damp=1e-6)
    assert int(obs_scores(group).argmin()) in (4, 5)
    assert int(activation_scores(group).argmin()) not in (4, 5)


def test_registry_did_you_mean_and_custom() -> None:
    with pytest.raises(KeyError, match="Did you mean 'activation'"):
        get_channel_importance("activaton")
    with pytest.raises(ValueError, match="already registered"):
        register_channel_importance("obs")(lambda g: g.magnitude)

    @register_channel_importance("test-reverse-magnitude", calibrated=False)
    def reverse(group: GroupStats) -> torch.Tensor:
        return -group.magnitude

    fn, calibrated = get_channel_importance("test-reverse-magnitude")
    assert not calibrated
    assert torch.equal(fn(GroupStats(3, [], torch.tensor([1.0, 3.0, 2.0]))), torch.tensor([-1.0, -3.0, -2.0]))


def test_statistics_add_across_batches() -> None:
    """The statistic is a plain sum: two halves' grams add to the whole's, so the scores agree."""
    x, w, b = _data()
    whole = _stats(x, w, b)
    halves = [_stats(x[:100], w, b), _stats(x[100:], w, b)]
    summed = ConsumerStats("fc", w, b, halves[0].gram + halves[1].gram, whole.columns)
    for fn in (activation_scores, obs_scores):
        a = fn(GroupStats(8, [whole], torch.ones(8), pruned=2))
        c = fn(GroupStats(8, [summed], torch.ones(8), pruned=2))
        assert torch.allclose(a, c)


@pytest.mark.parametrize("bias", [True, False])
def test_corrected_weight_fits_the_calibration_outputs_from_new_inputs(bias: bool) -> None:
    """Sequential pruning: inputs x' changed upstream; the corrected weight is lstsq of W·x + b on [x', 1]."""
    x, w, b = _data()
    x_new = x + 0.3 * torch.randn_like(x)
    b = b if bias else None
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    xna = torch.cat([x_new, torch.ones(len(x), 1, dtype=F64)], 1)
    c = ConsumerStats("fc", w, b, xna.T @ xna, torch.arange(8).reshape(-1, 1))
    w2, b2 = corrected_weight(c, xna.T @ xa, 0.0)
    y = x @ w.T + (0 if b is None else b)
    sol = torch.linalg.lstsq(xna if bias else x_new, y).solution
    assert torch.allclose(w2, sol[:8].T, atol=1e-9)
    if bias:
        assert b2 is not None and torch.allclose(b2, sol[8], atol=1e-9)
    else:
        assert b2 is None
