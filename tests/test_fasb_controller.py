"""FASB bookkeeping without an engine: when checks fire, what is kept, what the client may see, and
how the worker-side planner monitors and then steers a request."""

import numpy as np
import pytest
import torch

from vllm_steer.engine.fasb import FasbController, FasbUpdate
from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.engine.steering_table import RankLayout, SteeringTable
from vllm_steer.engine.step_planner import StepPlanner
from vllm_steer.errors import SpecError
from vllm_steer.pack import ModelShape
from vllm_steer.pack.synthetic import random_pack
from vllm_steer.pack_registry import PackRegistry
from vllm_steer.spec import SteeringSpec, parse_spec

SHAPE = ModelShape(architecture="LlamaForCausalLM", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                   hidden_size=32)


def _spec(**kw):
    return SteeringSpec(pack="p", method="fasb", alpha=10.0, **kw)


def test_checks_start_at_min_tokens_or_on_the_final_step():
    ctl = FasbController()
    ctl.track("r", _spec(backtrack=3, min_tokens=5), num_prompt_tokens=7)
    assert ctl.check("r", 0.1, num_generated=4, final=False) is None  # too early
    assert ctl.check("r", 0.9, num_generated=5, final=False) is None  # score above the threshold
    fired = ctl.check("r", 0.2, num_generated=6, final=False)
    assert fired.keep == 3 and fired.update.steer_from == 7 + 3 - 1
    assert fired.update.strength == pytest.approx(10.0 * 0.8) and not fired.update.monitor
    assert ctl.check("r", 0.0, num_generated=9, final=True) is None  # max_backtracks = 1

    ctl.track("f", _spec(backtrack=3, min_tokens=50), num_prompt_tokens=4)
    assert ctl.check("f", 0.1, num_generated=20, final=False) is None
    assert ctl.check("f", 0.1, num_generated=20, final=True).keep == 17


def test_short_generations_restart_from_the_prompt():
    ctl = FasbController()
    ctl.track("r", _spec(backtrack=10), num_prompt_tokens=5)
    fired = ctl.check("r", 0.4, num_generated=10, final=False)
    assert fired.keep == 0 and fired.update.steer_from == 4  # the last prompt token
    assert ctl.num_recomputed_tokens == 10


def test_commit_horizon_never_releases_what_a_later_check_can_drop():
    spec = _spec(backtrack=3, min_tokens=1, max_backtracks=2)
    ctl = FasbController()
    ctl.track("r", spec, num_prompt_tokens=2)
    state = ctl.requests["r"]
    released = []
    for g in range(1, 8):
        state.held_tokens.append(g)
        state.held_logprobs.append(None)
        n = state.releasable(finished=False)
        released += state.held_tokens[:n]
        del state.held_tokens[:n], state.held_logprobs[:n]
        state.released += n
        # worst case: a check fires at g + 1 (keeps g + 1 - s), then another right after that
        # backtrack, at g + 2 - s (keeps g + 2 - 2s)
        assert len(released) <= max(0, g + 2 - 2 * spec.backtrack)
    assert released == [1, 2, 3]
    assert state.releasable(finished=True) == len(state.held_tokens) == 4


def _run_fasb_request(ctl, req_id, scores, finals, max_tokens):
    """Drive one tracked request the way the scheduler does: each step appends a sampled token,
    checks it (a firing check vetoes the stop and drops tokens), then applies the commit horizon.
    Tokens are unique step numbers, so a regenerated token never equals the one it replaces.
    Returns (the request's final tokens, what the client received)."""
    state = ctl.requests[req_id]
    tokens, client = [], []
    for step, (score, final) in enumerate(zip(scores, finals)):
        tokens.append(step)
        finished = final or len(tokens) >= max_tokens
        fired = ctl.check(req_id, score, num_generated=len(tokens), final=finished)
        if fired is not None:
            del tokens[fired.keep:]
            finished = False
        state.held_tokens.append(step)
        state.held_logprobs.append(None)
        state.truncate(len(tokens))
        n = state.releasable(finished)
        client += state.held_tokens[:n]
        del state.held_tokens[:n], state.held_logprobs[:n]
        state.released += n
        assert client == tokens[: len(client)], "the client holds a token the request no longer has"
        if finished:
            return tokens, client
    return tokens, client + state.held_tokens


def test_two_backtracks_in_a_row_never_retract_a_released_token():
    """The case that killed the server: after a backtrack to `keep`, the next check (at keep + 1)
    fires again and drops tokens the one-backtrack horizon had already released."""
    ctl = FasbController()
    ctl.track("r", _spec(backtrack=4, max_backtracks=2), num_prompt_tokens=3)
    tokens, client = _run_fasb_request(ctl, "r", [0.9] * 8 + [0.1, 0.1] + [0.9] * 6, [False] * 16, 100)
    assert ctl.num_backtracks == 2
    assert client == tokens[: len(client)]


def test_random_fasb_requests_never_raise_nor_release_a_dropped_token():
    rng = np.random.default_rng(1234)
    ctl = FasbController()
    fired_twice_or_more = 0
    for i in range(4000):
        s = int(rng.integers(0, 12))
        spec = _spec(
            backtrack=s,
            min_tokens=int(rng.integers(1, 16)) if rng.random() < 0.5 else None,
            max_backtracks=int(rng.integers(0, 9)),
            threshold=float(rng.uniform(0.2, 0.8)),
            strength=str(rng.choice(["code", "paper"])),
        )
        req_id = f"r{i}"
        ctl.track(req_id, spec, num_prompt_tokens=int(rng.integers(1, 20)))
        steps = 200
        # scores that drift, so requests fire in bursts as well as alone
        scores = np.clip(rng.normal(0.5, 0.3, steps).cumsum() / np.arange(1, steps + 1) + rng.normal(0, 0.3, steps), 0, 1)
        finals = rng.random(steps) < float(rng.uniform(0.0, 0.1))
        max_tokens = int(rng.integers(1, 60))
        tokens, client = _run_fasb_request(ctl, req_id, scores.tolist(), finals.tolist(), max_tokens)
        assert client == tokens
        fired_twice_or_more += ctl.requests[req_id].backtracks >= 2
        ctl.forget(req_id)
    assert fired_twice_or_more > 500  # the sequences exercise repeated backtracks


def test_fasb_spec_fields_and_pack_requirements():
    spec = parse_spec({"steering_pack": "p", "steering_method": "fasb", "steering_threshold": 0.6,
                       "steering_backtrack": 4})
    assert spec.monitored and spec.first_check == 4 and spec.steer_start(9) is None
    assert _spec(backtrack=0).first_check == 1
    with pytest.raises(SpecError, match="steering.threshold"):
        parse_spec({"steering": {"pack": "p", "method": "fasb", "threshold": 1.5}})
    with pytest.raises(SpecError, match="applies to method 'fasb' only"):
        parse_spec({"steering": {"pack": "p", "method": "iti", "backtrack": 3}})
    with pytest.raises(SpecError, match="steering_max_backtracks"):
        parse_spec({"steering_pack": "p", "steering_method": "fasb", "steering_max_backtracks": -1})
    registry = PackRegistry(model=SHAPE)
    registry.add(random_pack(SHAPE, "p", num_heads_selected=3, seed=0))  # no probes
    with pytest.raises(SpecError, match="needs a pack with ITI heads and probes") as info:
        registry.resolve(_spec())
    assert info.value.field == "steering.method"


def test_steer_from_spec():
    assert SteeringSpec(pack="p", steer_from=12).steer_start(40) == 12
    with pytest.raises(SpecError, match="not both"):
        parse_spec({"steering": {"pack": "p", "steer_from": 3, "prompt_positions": "all"}})
    with pytest.raises(SpecError, match="does not apply"):
        parse_spec({"steering": {"pack": "p", "method": "fasb", "steer_from": 3}})


def _planner():
    registry = PackRegistry(model=SHAPE)
    registry.add(random_pack(SHAPE, "p", num_heads_selected=5, with_probes=True, seed=0))
    layout = RankLayout(3, 4, 8, 32)
    table = SteeringTable(layout, registry.head_layers, [], max_num_tokens=64, max_num_reqs=4, device="cpu")
    probes = ProbeTable(layout, ProbeTable.layers_of(registry.packs.values()), 64, table.num_slots, "cpu")
    return StepPlanner(table, registry, probes), registry


def test_planner_probes_newest_tokens_then_steers_after_an_update():
    from vllm_steer.engine.fasb import FasbUpdate

    planner, registry = _planner()
    specs = {"m": {"pack": "p", "method": "fasb", "alpha": 4.0}, "v": None}
    args = lambda r: {"steering": specs[r]} if specs.get(r) else None  # noqa: E731
    # m: full prefill of 5 tokens (samples) ; v: unsteered decode
    planner.plan_step(["m", "v"], np.array([5, 1]), np.array([0, 9]), np.array([5, 9]), args, np.array([5, 10]))
    assert planner.table.token_slots[:6].tolist() == [0, 0, 0, 0, 1, 0]
    assert planner.monitored.req_ids == ["m"] and planner.monitored.rows.tolist() == [4]
    assert torch.count_nonzero(planner.table.head_rows[:, 1]) == 0  # monitored, not steered yet
    # a partial prefill chunk does not sample: nothing to probe
    planner.plan_step(["m"], np.array([3]), np.array([0]), np.array([5]), args, np.array([5]))
    assert not planner.monitored and planner.table.token_slots[:3].tolist() == [0, 0, 0]
    # the backtrack: steer from position 6 at strength 2.5, stop monitoring
    planner.apply_update(FasbUpdate("m", strength=2.5, steer_from=6, monitor=False), args)
    planner.plan_step(["m"], np.array([3]), np.array([4]), np.array([5]), args, np.array([7]))
    assert planner.table.token_slots[:3].tolist() == [0, 0, 1] and not planner.monitored
    assert planner.table.token_scales[:4].tolist() == [1.0, 1.0, 2.5, 1.0]
    pack = registry.packs["p"]
    k = 0
    layer, head = pack.selected_heads[k]
    row = planner.table.head_rows_of(layer)[1, head * 8:(head + 1) * 8]
    assert torch.allclose(row, pack.head_sigmas[k] * pack.head_directions[k])  # unit alpha; scale 2.5
    # an unsteered step resets the scales
    planner.plan_step(["v"], np.array([1]), np.array([9]), np.array([9]), args, np.array([10]))
    assert planner.table.token_scales[:4].tolist() == [1.0] * 4


def test_a_second_backtrack_keeps_the_first_ones_steering_of_the_kept_positions():
    """Positions the first backtrack steered and the second keeps hold KV computed at the first
    strength: a recompute of a partly kept block must use it again, and the prefix-cache key must
    name the whole history, not only the last backtrack."""
    ctl = FasbController()
    ctl.track("r", _spec(backtrack=2, min_tokens=3, max_backtracks=3), num_prompt_tokens=5)
    first = ctl.check("r", 0.2, num_generated=4, final=False)  # keeps 2: steers from 6 at 8.0
    second = ctl.check("r", 0.6, num_generated=5, final=False)
    assert second is None  # 0.6 >= threshold 0.5
    second = ctl.check("r", 0.4, num_generated=6, final=False)  # keeps 4: steers from 8 at 6.0
    assert first.update.segments == ((6, pytest.approx(8.0)),)
    assert second.update.segments == ((6, pytest.approx(8.0)), (8, pytest.approx(6.0)))
    spec = ctl.requests["r"].spec
    alone = FasbUpdate("x", strength=second.update.strength, steer_from=8, monitor=False)
    assert second.update.cache_key(spec)[1] == 6 and alone.cache_key(spec)[1] == 8
    assert second.update.cache_key(spec)[0] != alone.cache_key(spec)[0]
    third = ctl.check("r", 0.0, num_generated=5, final=False)  # keeps 3: from 7, drops (8, 6.0)
    assert third.update.segments == ((6, pytest.approx(8.0)), (7, pytest.approx(10.0)))

    planner, _ = _planner()
    args = lambda r: {"steering": {"pack": "p", "method": "fasb", "alpha": 10.0}}  # noqa: E731
    planner.plan_step(["r"], np.array([5]), np.array([0]), np.array([5]), args, np.array([5]))
    for fired in (first, second):
        planner.apply_update(fired.update, args)
    # a resume that recomputes positions 4..8: 6 and 7 at the first strength, 8 on at the second
    planner.plan_step(["r"], np.array([5]), np.array([4]), np.array([5]), args, np.array([9]))
    assert planner.table.token_slots[:5].tolist() == [0, 0, 1, 1, 1]
    assert planner.table.token_scales[:5].tolist() == pytest.approx([1.0, 1.0, 8.0, 8.0, 6.0])
    planner.plan_step(["r"], np.array([1]), np.array([9]), np.array([5]), args, np.array([10]))
    assert planner.table.token_scales[0].item() == pytest.approx(6.0)


def test_paper_strength_follows_the_previous_tokens_score():
    from vllm_steer.engine.fasb import FasbUpdate

    planner, _ = _planner()
    specs = {"m": {"pack": "p", "method": "fasb", "alpha": 4.0, "threshold": 0.5, "strength": "paper"}}
    args = lambda r: {"steering": specs[r]}  # noqa: E731
    planner.plan_step(["m"], np.array([5]), np.array([0]), np.array([5]), args, np.array([5]))
    planner.apply_update(FasbUpdate("m", strength=3.0, steer_from=6, monitor=True, adaptive=True), args)
    # resume: recompute positions 5..6 (6 is the last kept token, steered at the trigger strength)
    planner.plan_step(["m"], np.array([2]), np.array([5]), np.array([5]), args, np.array([7]))
    assert planner.table.token_slots[:2].tolist() == [0, 1] and planner.table.token_scales[:2].tolist() == [1.0, 3.0]
    assert planner.monitored.rows.tolist() == [1] and planner.monitored.positions.tolist() == [6]
    planner.note_scores(["m"], [6], [0.2])  # below the threshold: position 7 at 4 * 0.8
    planner.plan_step(["m"], np.array([1]), np.array([7]), np.array([5]), args, np.array([8]))
    assert planner.table.token_scales[0].item() == pytest.approx(3.2)
    planner.note_scores(["m"], [7], [0.7])  # at or above it: position 8 unsteered (strength 0)
    planner.plan_step(["m"], np.array([1]), np.array([8]), np.array([5]), args, np.array([9]))
    assert planner.table.token_scales[0].item() == 0.0
    # a re-prefill after preemption replays the history position by position
    planner.plan_step(["m"], np.array([9]), np.array([0]), np.array([5]), args, np.array([9]))
    assert planner.table.token_scales[:9].tolist() == pytest.approx([1, 1, 1, 1, 1, 1, 3.0, 3.2, 0.0])


def test_probe_table_scores_are_mean_sigmoids_of_each_tokens_pack_probes():
    packs = [random_pack(SHAPE, name, num_heads_selected=k, with_probes=True, seed=seed)
             for name, k, seed in (("p", 5, 0), ("q", 3, 1))]
    layout = RankLayout(3, 4, 8, 32)
    probes = ProbeTable(layout, ProbeTable.layers_of(packs), 64, 4, "cpu")
    acts = torch.randn(len(probes.probe_layers), 4, 4 * 8)  # [L_p, tokens, H*D]
    slot_of_token = {2: 1, 3: 2, 1: 1}
    probes.write_slot(1, packs[0])
    probes.write_slot(2, packs[1])
    # what the fused op writes: per-head dots with each token's slot's probe rows
    for j in range(len(probes.probe_layers)):
        for t, slot in slot_of_token.items():
            probes.probe_out[j, t] = (acts[j, t] * probes.probe_rows[j, slot]).view(4, 8).sum(-1)

    def expected_mean(pack, t):
        logits = [float(acts[probes.probe_layers.index(l), t, h * 8:(h + 1) * 8] @ pack.probe_weights[k])
                  + float(pack.probe_biases[k]) for k, (l, h) in enumerate(pack.selected_heads)]
        return float(torch.sigmoid(torch.tensor(logits)).mean())

    one_pack = {"p": (packs[0], [0, 1])}
    means = probes.sigmoid_sums(torch.tensor([2, 1]), one_pack) / probes.probe_counts(one_pack, 2)
    assert means.tolist() == pytest.approx([expected_mean(packs[0], 2), expected_mean(packs[0], 1)], rel=1e-5)
    two_packs = {"p": (packs[0], [0, 2]), "q": (packs[1], [1])}
    means = probes.sigmoid_sums(torch.tensor([2, 3, 1]), two_packs) / probes.probe_counts(two_packs, 3)
    expected = [expected_mean(packs[0], 2), expected_mean(packs[1], 3), expected_mean(packs[0], 1)]
    assert means.tolist() == pytest.approx(expected, rel=1e-5)


def test_steering_engines_select_the_v1_model_runner(monkeypatch):
    from vllm_steer.errors import ConfigError
    from vllm_steer.integration.frontend import V2_RUNNER_ENV, _select_v1_model_runner

    monkeypatch.delenv(V2_RUNNER_ENV, raising=False)
    _select_v1_model_runner()
    import os

    assert os.environ[V2_RUNNER_ENV] == "0"
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    with pytest.raises(ConfigError) as info:
        _select_v1_model_runner()
    assert info.value.field == V2_RUNNER_ENV
