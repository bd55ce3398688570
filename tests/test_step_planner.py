"""The worker-side planner and table on their own (no engine): slot maps, TP slicing, reuse."""

import numpy as np
import pytest
import torch

from vllm_steer.engine.steering_table import RankLayout, SteeringTable
from vllm_steer.engine.step_planner import StepPlanner
from vllm_steer.pack import ModelShape
from vllm_steer.pack.synthetic import random_pack
from vllm_steer.pack_registry import PackRegistry

SHAPE = ModelShape(architecture="LlamaForCausalLM", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                   hidden_size=32)


def _planner(tp_rank=0, tp_size=1, max_reqs=4):
    registry = PackRegistry(model=SHAPE)
    registry.add(random_pack(SHAPE, "p", num_heads_selected=5, residual_layers=[2], seed=0))
    layout = RankLayout(3, 4, 8, 32, tp_rank=tp_rank, tp_size=tp_size)
    table = SteeringTable(layout, registry.head_layers, registry.residual_layers, max_num_tokens=64,
                          max_num_reqs=max_reqs, device="cpu")
    return StepPlanner(table, registry), registry


def _args(specs):
    return lambda req_id: {"steering": specs[req_id]} if specs.get(req_id) else None


def test_slot_map_follows_positions_and_modes():
    planner, _ = _planner()
    specs = {
        "a": {"pack": "p", "alpha": 1.0},  # last prompt token on
        "b": None,
        "c": {"pack": "p", "alpha": 2.0, "prompt_positions": "all"},
        "d": {"pack": "p", "alpha": 3.0, "prompt_positions": "none"},
    }
    # a: prefill of a 4-token prompt; b: 2 tokens; c: a 3-token chunk at 2..4; d: decode at position 5
    n = planner.plan_step(["a", "b", "c", "d"], np.array([4, 2, 3, 1]), np.array([0, 0, 2, 5]),
                          np.array([4, 2, 9, 5]), _args(specs))
    slots = planner.table.token_slots[:10].tolist()
    assert slots == [0, 0, 0, 1, 0, 0, 3, 3, 3, 4]
    assert n == 5
    # Next step, nothing steered: every slot written before is cleared.
    planner.plan_step(["b"], np.array([1]), np.array([2]), np.array([2]), _args(specs))
    assert planner.table.token_slots[:10].tolist() == [0] * 10


def test_rows_hold_alpha_sigma_direction_and_follow_slot_owner_changes():
    planner, registry = _planner()
    pack = registry.packs["p"]
    specs = {"x": {"pack": "p", "alpha": 2.0}, "y": {"pack": "p", "alpha": -1.0}}
    planner.plan_step(["x"], np.array([1]), np.array([3]), np.array([3]), _args(specs))
    table = planner.table
    for i, (layer, head) in enumerate(pack.selected_heads):
        got = table.head_rows_of(layer)[1, head * 8:(head + 1) * 8]
        torch.testing.assert_close(got, 2.0 * pack.head_sigmas[i] * pack.head_directions[i])
    # Another request takes batch row 0 (slot 1): its own rows replace x's.
    planner.plan_step(["y"], np.array([1]), np.array([3]), np.array([3]), _args(specs))
    layer, head = pack.selected_heads[0]
    torch.testing.assert_close(table.head_rows_of(layer)[1, head * 8:(head + 1) * 8],
                               -1.0 * pack.head_sigmas[0] * pack.head_directions[0])
    # ITI leaves the residual rows of the slot at zero, residual leaves the head rows at zero.
    assert table.residual_rows[:, 1].abs().sum() == 0
    planner.forget(["y"])
    planner.plan_step(["y"], np.array([1]), np.array([3]), np.array([3]),
                      _args({"y": {"pack": "p", "method": "residual", "alpha": 1.0}}))
    assert table.head_rows[:, 1].abs().sum() == 0
    torch.testing.assert_close(table.residual_rows_of(2)[1], pack.residual_vectors[0])


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tensor_parallel_rank_holds_only_its_heads(tp_rank):
    planner, registry = _planner(tp_rank=tp_rank, tp_size=2)
    pack = registry.packs["p"]
    planner.plan_step(["x"], np.array([1]), np.array([0]), np.array([1]), _args({"x": {"pack": "p", "alpha": 1.0}}))
    table = planner.table
    assert table.head_rows.shape[-1] == 2 * 8  # two local heads of eight dims
    for i, (layer, head) in enumerate(pack.selected_heads):
        local = head - 2 * tp_rank
        if 0 <= local < 2:
            torch.testing.assert_close(table.head_rows_of(layer)[1, local * 8:(local + 1) * 8],
                                       pack.head_sigmas[i] * pack.head_directions[i])
    expected_nonzero = {(l, h - 2 * tp_rank) for l, h in pack.selected_heads if 0 <= h - 2 * tp_rank < 2}
    nonzero = {
        (layer, c // 8)
        for layer in table.head_layers
        for c in torch.nonzero(table.head_rows_of(layer)[1]).flatten().tolist()
    }
    assert nonzero == expected_nonzero


def test_bad_spec_in_worker_runs_unsteered_instead_of_crashing():
    planner, _ = _planner()
    n = planner.plan_step(["z"], np.array([2]), np.array([0]), np.array([2]),
                          _args({"z": {"pack": "unknown", "alpha": 1.0}}))
    assert n == 0 and planner.table.token_slots[:2].tolist() == [0, 0]


def test_distinct_compositions_write_each_slot_once_not_every_step(monkeypatch):
    """Per step the planner's work is O(batch): a slot's rows are written when its request (or that
    request's steering) changes, however many distinct compositions the batch holds; a step only
    writes the per-token slot map."""
    registry = PackRegistry(model=SHAPE)
    registry.add(random_pack(SHAPE, "p", num_heads_selected=5, residual_layers=[0, 2], seed=0))
    registry.add(random_pack(SHAPE, "q", num_heads_selected=3, residual_layers=[1, 2], seed=1))
    layout = RankLayout(3, 4, 8, 32)
    table = SteeringTable(layout, registry.head_layers, registry.residual_layers, max_num_tokens=64,
                          max_num_reqs=8, device="cpu")
    planner = StepPlanner(table, registry)
    specs = {f"r{i}": [{"pack": "p", "alpha": 1.0 + i}, {"pack": "q", "method": "residual", "alpha": -0.5 * i},
                       {"pack": "q", "alpha": 0.25 * i}] for i in range(8)}
    writes = []
    original = SteeringTable.write_sum
    monkeypatch.setattr(SteeringTable, "write_sum", lambda self, slot, parts: (writes.append(slot),
                                                                                 original(self, slot, parts)))
    ids = list(specs)
    for step in range(6):
        planner.plan_step(ids, np.ones(8), np.full(8, 5 + step), np.full(8, 5), _args(specs))
    assert sorted(writes) == list(range(1, 9))  # once per request, not per step
    # each slot holds the sum of its members' rows at their alphas
    p, q = registry.packs["p"], registry.packs["q"]
    for i in range(8):
        torch.testing.assert_close(table.residual_rows_of(2)[i + 1], -0.5 * i * q.residual_vectors[1])
        expected = torch.zeros(len(table.head_layers), 4 * 8)
        for pack, alpha in ((p, 1.0 + i), (q, 0.25 * i)):
            for k, (layer, head) in enumerate(pack.selected_heads):
                row = table.head_layers.index(layer)
                expected[row, head * 8:(head + 1) * 8] += alpha * pack.head_sigmas[k] * pack.head_directions[k]
        torch.testing.assert_close(table.head_rows[:, i + 1], expected)
    assert table.token_slots[:8].tolist() == list(range(1, 9))
