"""Data schedulers against the reference BaseDataScheduler."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

import fx_sparsify.data as fxd

from ._ref import RefBaseDataScheduler, RefDataNormSparsifier


class Halve(fxd.BaseDataScheduler):
    """The reference tests' ImplementedDataScheduler."""

    def get_schedule_param(self):
        if self.last_epoch > 0:
            return {n: c["sparsity_level"] * 0.5 for n, c in self.data_sparsifier.data_groups.items()}
        return self.base_param


class RefHalve(RefBaseDataScheduler):
    def get_schedule_param(self):
        if self.last_epoch > 0:
            return {n: c["sparsity_level"] * 0.5 for n, c in self.data_sparsifier.data_groups.items()}
        return self.base_param


def _pair():
    ours, ref = fxd.DataNormSparsifier(sparsity_level=0.8), RefDataNormSparsifier(sparsity_level=0.8)
    data = [torch.randn(8, 8), torch.randn(4, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, d in enumerate(data):
            ours.add_data(f"d{i}", d.clone(), sparsity_level=0.4 + 0.2 * i)
            ref.add_data(f"d{i}", d.clone(), sparsity_level=0.4 + 0.2 * i)
    return ours, ref


def test_schedule_matches_reference():
    ours, ref = _pair()
    so, sr = Halve(ours, "sparsity_level"), RefHalve(ref, "sparsity_level")
    assert so.base_param == sr.base_param
    for _ in range(3):
        ours.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.step()
        so.step()
        sr.step()
        assert so.get_last_param() == sr.get_last_param()
        assert so.last_epoch == sr.last_epoch
        for name in ours.data_groups:
            assert torch.equal(ours.get_mask(name), ref.get_mask(name).bool().reshape(ours.get_mask(name).shape))


def test_warns_when_scheduler_steps_first():
    ours, _ = _pair()
    scheduler = Halve(ours, "sparsity_level")
    with pytest.warns(UserWarning, match="before"):
        scheduler.step()


def test_state_dict_round_trip_and_pickle():
    ours, _ = _pair()
    scheduler = fxd.LambdaDataScheduler(ours, "sparsity_level", lambda epoch: 0.9**epoch)
    for _ in range(2):
        ours.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "data_sparsifier" not in state and "fn" not in state
    fresh_sparsifier = pickle.loads(pickle.dumps(ours))
    fresh = fxd.LambdaDataScheduler(fresh_sparsifier, "sparsity_level", lambda epoch: 0.9**epoch)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == scheduler.last_epoch and fresh.base_param == scheduler.base_param
    ours.step()
    scheduler.step()
    fresh_sparsifier.step()
    fresh.step()
    assert fresh.get_last_param() == scheduler.get_last_param()
    assert fresh_sparsifier.data_groups == ours.data_groups


def test_errors():
    ours, _ = _pair()
    with pytest.raises(TypeError, match="BaseDataSparsifier"):
        Halve(object(), "sparsity_level")
    with pytest.raises(KeyError, match="sparsity_lvl"):
        Halve(ours, "sparsity_lvl")
    before = {n: dict(c) for n, c in ours.data_groups.items()}
    scheduler = fxd.LambdaDataScheduler(ours, "sparsity_level", lambda epoch: 1.0 + epoch)
    epoch = scheduler.last_epoch
    ours.step()
    with pytest.raises(ValueError, match="sparsity_level"):  # 0.8 * 2 > 1
        scheduler.step()
    assert scheduler.last_epoch == epoch and ours.data_groups == before
