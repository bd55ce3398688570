"""The L2S trainer on synthetic data: it learns an input-dependent target that Mean-S cannot."""

import pytest
import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.l2s import L2STrainOptions, train_l2s


def _data(n=400, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    kind = (x[:, 0] > 0).float().unsqueeze(1)  # two kinds of input, opposite desired directions
    direction = torch.randn(d, generator=gen)
    z = (2 * kind - 1) * direction + 0.05 * torch.randn(n, d, generator=gen)
    return x, z


def test_predictor_beats_mean_s_on_input_dependent_targets():
    x, z = _data()
    fit = train_l2s(x, z, L2STrainOptions(width=8, lr=1e-2, epochs=60, seed=1))
    rec = fit.record
    assert rec["val_cosine"] > 0.8 and rec["val_cosine_mean_s"] < 0.3
    assert fit.w_in.shape == (8, 16) and fit.w_out.shape == (16, 8) and fit.mean.shape == (16,)
    assert rec["num_train"] + rec["num_val"] == 400 and 0 <= rec["best_epoch"] < rec["epochs_run"]


def test_training_is_seeded_and_stops_early():
    x, z = _data(n=80)
    a = train_l2s(x, z, L2STrainOptions(width=4, lr=1e-2, epochs=200, patience=3, seed=2, loss="mse"))
    b = train_l2s(x, z, L2STrainOptions(width=4, lr=1e-2, epochs=200, patience=3, seed=2, loss="mse"))
    assert torch.equal(a.w_in, b.w_in) and torch.equal(a.w_out, b.w_out)
    assert a.record["epochs_run"] < 200


def test_bad_inputs_name_the_field():
    with pytest.raises(SteeringError) as info:
        train_l2s(torch.zeros(10, 4), torch.zeros(10, 5))
    assert info.value.field == "targets"
    with pytest.raises(SteeringError, match="at least 4"):
        train_l2s(torch.zeros(2, 4), torch.zeros(2, 4))
