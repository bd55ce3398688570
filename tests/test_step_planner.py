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


def _gated_planner(max_reqs=4):
    from vllm_steer.engine.condition_gate import ConditionGate
    from vllm_steer.pack.synthetic import condition_pack

    registry = PackRegistry(model=SHAPE)
    registry.add(random_pack(SHAPE, "p", num_heads_selected=5, residual_layers=[2], seed=0))
    direction = torch.zeros(SHAPE.hidden_size)
    direction[0] = 1.0
    registry.add(condition_pack(SHAPE, "cond", direction, layer=1, threshold=0.5, comparison="above"))
    layout = RankLayout(3, 4, 8, 32)
    table = SteeringTable(layout, registry.head_layers, registry.residual_layers, max_num_tokens=64,
                          max_num_reqs=max_reqs, device="cpu")
    gate = ConditionGate(registry.packs["cond"], table, max_reqs, 64, "cpu")
    return StepPlanner(table, registry, gates={"cond": gate}), gate


def _stream(rows_by_token: list[list[float]]) -> torch.Tensor:
    """A [T, hidden] stream whose token t starts with rows_by_token[t] (the rest zero)."""
    x = torch.zeros(len(rows_by_token), SHAPE.hidden_size)
    for t, row in enumerate(rows_by_token):
        x[t, :len(row)] = torch.tensor(row)
    return x


def _slot_rows(table, slot):
    return torch.cat([table.head_rows[:, slot].flatten(), table.residual_rows[:, slot].flatten()])


def test_condition_gate_reads_prompts_over_chunks_and_gates_the_slot():
    """Direction e0, threshold 0.5 'above': a prompt whose mean state leans on e0 keeps its rows, one
    that does not gets zero rows, decided with its last prompt token in the forward; a request that
    moves to another slot takes its gate along; a prompt recomputed from the start (preemption) is
    read again from zero; one whose tokens were computed unread fails instead of running unsteered."""
    planner, gate = _gated_planner()
    table = planner.table
    specs = {r: {"pack": "p", "alpha": 2.0, "prompt_positions": "none", "condition": "cond"} for r in "abcd"}
    args = _args(specs)
    lean, flat, stale = [3.0, 1.0], [0.1, 1.0], [0.0, 50.0]

    def step(req_ids, counts, computed, prompts, rows_by_token):
        planner.plan_step(req_ids, np.array(counts), np.array(computed), np.array(prompts), args)
        gate.run(_stream(rows_by_token), torch.zeros(len(rows_by_token), SHAPE.hidden_size))

    # a: 10-token prompt leaning on e0 in chunks of 4, 4, 2; b: 6-token prompt that does not lean, 4 + 2;
    # c: 8-token prompt, its first chunk computed, then preempted and recomputed from the start.
    step(["a", "b", "c"], [4, 4, 4], [0, 0, 0], [10, 6, 8], [lean] * 4 + [flat] * 4 + [stale] * 4)
    before = {s: _slot_rows(table, s).clone() for s in (1, 2)}
    assert before[1].abs().sum() > 0 and before[2].abs().sum() > 0
    step(["a", "b"], [4, 2], [4, 4], [10, 6], [lean] * 4 + [flat] * 2)
    torch.testing.assert_close(_slot_rows(table, 1), before[1])  # a: not decided yet
    assert _slot_rows(table, 2).abs().sum() == 0  # b: decided in this forward, condition not met
    step(["b", "a", "c"], [1, 2, 4], [6, 8, 0], [6, 10, 8], [flat] + [lean] * 2 + [lean] * 4)
    # b moved to slot 1: its rows are rewritten, then multiplied by its gate
    assert _slot_rows(table, 1).abs().sum() == 0
    torch.testing.assert_close(_slot_rows(table, 2), before[1])  # a moved to slot 2, then met
    step(["c"], [4], [4], [8], [lean] * 4)
    assert _slot_rows(table, 1).abs().sum() > 0  # c: read again from zero (the stale chunk would fail it)
    planner.plan_step(["a", "c"], np.array([1, 1]), np.array([10, 8]), np.array([10, 8]), args)
    assert _slot_rows(table, 2).abs().sum() > 0 and planner.take_failures() == {}
    # d: its first step starts mid-prompt (tokens computed without being read): it fails
    planner.plan_step(["d"], np.array([4]), np.array([4]), np.array([9]), args)
    assert "d" in planner.take_failures()
    planner.forget(["a", "b", "c", "d"])
    assert len(gate._free_rows) == gate.sums.shape[0] - 1


def test_cached_unit_rows_are_bounded_in_bytes_and_evicted_rows_are_rebuilt(monkeypatch):
    """The unit-alpha rows cached per (pack, method, subset) sit on the device: on wide models the
    entry count alone would let them grow past a GiB, so the cache is bounded in bytes too."""
    from vllm_steer.engine import steering_table
    from vllm_steer.spec import SteeringSpec

    planner, registry = _planner()
    table, pack = planner.table, registry.packs["p"]
    entry = table._base_rows(SteeringSpec(pack="p", alpha=1.0), pack)
    entry_bytes = entry[0].nbytes + entry[1].nbytes
    monkeypatch.setattr(steering_table, "BASE_CACHE_BYTES", 3 * entry_bytes)
    subsets = [[[l, h]] for l, h in pack.selected_heads]  # five single-head subsets: five entries
    for heads in subsets:
        table.write_slot(1, SteeringSpec(pack="p", alpha=2.0, heads=heads), pack)
        assert table.cached_base_bytes() <= 3 * entry_bytes
    assert len(table._bases) == 3
    # the first subset was evicted; writing it again rebuilds the same rows
    spec = SteeringSpec(pack="p", alpha=2.0, heads=subsets[0])
    table.write_slot(2, spec, pack)
    layer, head = pack.selected_heads[0]
    torch.testing.assert_close(table.head_rows_of(layer)[2, head * 8:(head + 1) * 8],
                               2.0 * pack.head_sigmas[0] * pack.head_directions[0])
    assert table.head_rows[:, 2].abs().sum() == table.head_rows_of(layer)[2, head * 8:(head + 1) * 8].abs().sum()
    assert table.buffer_bytes() == 4 * 64 * 2 + 4 * (len(table.head_layers) * 5 * 32 + 1 * 5 * 32)
