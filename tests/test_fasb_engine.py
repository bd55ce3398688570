"""FASB inside the engine: probe scores, backtracking and the commit horizon.

Parity is against ``tests/reference/hf_fasb.py``, an independent HF-transformers implementation of
FASB's KV-cached semantics that reads the pack straight from its safetensors file.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, fitted_probe_pack, greedy, make_llm, random_prompts, token_ids
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

MAX_NEW = 14
CONSTANT_P = 0.3  # the crafted probes' mean P(desired) at every token


class Case:
    def __init__(self, path, packs, llm):
        from transformers import AutoModelForCausalLM

        self.path, self.packs, self.llm = path, packs, llm
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.raw = {name: load_file(str(p)) for name, p in packs.items()}
        self.vocab = self.hf.config.vocab_size

    def reference(self, prompt, spec, max_tokens=MAX_NEW, stop_token=None):
        from reference.hf_fasb import fasb_generate

        return fasb_generate(
            self.hf, prompt, self.raw[spec["pack"]], alpha=spec["alpha"],
            threshold=spec.get("threshold", 0.5), backtrack=spec.get("backtrack", 10),
            min_tokens=spec.get("min_tokens"), max_backtracks=spec.get("max_backtracks", 1),
            max_tokens=max_tokens, eos_token_id=stop_token, ignore_eos=stop_token is None,
            **({"strength": spec["strength"]} if "strength" in spec else {}),
        )


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("fasb_packs")
    probed = random_pack(shape, "probed", num_heads_selected=6, with_probes=True, seed=11, sigma_scale=4.0)
    crafted = with_constant_probes(probed, CONSTANT_P, name="crafted")
    packs = {"probed": save_pack(folder / "probed.safetensors", probed),
             "crafted": save_pack(folder / "crafted.safetensors", crafted),
             "fitted": save_pack(folder / "fitted.safetensors", fitted_probe_pack(path, "fitted"))}
    llm = make_llm(path, packs=list(packs.values()), block_size=32)
    yield Case(path, packs, llm)
    close_llm(llm)


def _prompts(case, n, seed):
    return [{"prompt_token_ids": p} for p in random_prompts(n, case.vocab, seed=seed, min_len=4, max_len=20)]


def test_threshold_that_never_fires_changes_nothing(case):
    prompts = _prompts(case, 6, seed=1)
    plain = case.llm.generate(prompts, greedy(MAX_NEW, logprobs=3), use_tqdm=False)
    fasb = case.llm.generate(
        prompts, greedy(MAX_NEW, {"pack": "probed", "method": "fasb", "alpha": 9.0, "threshold": 0.0},
                        logprobs=3), use_tqdm=False)
    assert token_ids(fasb) == token_ids(plain)
    for a, b in zip(plain, fasb):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: l.logprob for t, l in la.items()} == {t: l.logprob for t, l in lb.items()}


CRAFTED = [
    {"backtrack": 3},  # fires at 3 generated tokens, keeps none: restart from the prompt
    {"backtrack": 2, "min_tokens": 6},  # fires at 6, keeps 4
    {"backtrack": 0, "min_tokens": 5},  # s = 0: keeps everything, steers from the newest token
    {"backtrack": 4, "min_tokens": 5, "max_backtracks": 2},  # fires twice
    {"backtrack": 5, "min_tokens": 100},  # fires only on the step that would finish the request
    {"backtrack": 3, "min_tokens": 4, "max_backtracks": 0},  # scores only
    {"backtrack": 1, "min_tokens": 4},
    {"backtrack": 3, "min_tokens": 4, "strength": "paper"},  # constant scores: same as "code"
]


@pytest.mark.parametrize("knobs", CRAFTED, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_crafted_probes_fire_where_the_reference_fires(case, knobs):
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "threshold": 0.5, **knobs}
    prompts = _prompts(case, 4, seed=2)
    got = token_ids(case.llm.generate(prompts, greedy(MAX_NEW, spec), use_tqdm=False))
    for prompt, tokens in zip(prompts, got):
        ref = case.reference(prompt["prompt_token_ids"], spec)
        assert len(ref.triggers) == min(knobs.get("max_backtracks", 1), 2)
        assert tokens == ref.tokens
        assert len(tokens) == MAX_NEW


def test_crafted_backtrack_on_a_stop_token_step(case):
    """The step that samples a stop token is checked too; firing there vetoes the stop."""
    prompt = _prompts(case, 1, seed=3)[0]
    plain = token_ids(case.llm.generate([prompt], greedy(MAX_NEW), use_tqdm=False))[0]
    stop = plain[6]  # a stop token the unsteered run reaches at its 7th token
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "min_tokens": 100}
    params = greedy(MAX_NEW, spec, stop_token_ids=[stop])
    params.ignore_eos = False
    got = token_ids(case.llm.generate([prompt], params, use_tqdm=False))[0]
    ref = case.reference(prompt["prompt_token_ids"], spec, stop_token=stop)
    assert ref.triggers and ref.triggers[0]["generated"] == plain.index(stop) + 1
    assert got == ref.tokens


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_real_probe_scores_fire_like_the_reference(case, rule):
    """Random (non-constant) probes: whether and where a request fires depends on its tokens; with
    strength="paper" each regenerated token's strength also depends on the previous token's score."""
    prompts = _prompts(case, 10, seed=4)
    spec = {"pack": "probed", "method": "fasb", "alpha": 8.0, "threshold": 0.0, "backtrack": 3, "min_tokens": 3,
            "strength": rule}
    # The median of each prompt's lowest checked unsteered score splits the prompts.
    lowest = [min(case.reference(p["prompt_token_ids"], spec).scores[2:]) for p in prompts]
    spec["threshold"] = float(np.median(lowest))
    got = token_ids(case.llm.generate(prompts, greedy(MAX_NEW, spec), use_tqdm=False))
    fired = 0
    for prompt, tokens in zip(prompts, got):
        ref = case.reference(prompt["prompt_token_ids"], spec)
        fired += bool(ref.triggers)
        assert tokens == ref.tokens
    assert 0 < fired < len(prompts), f"{fired} of {len(prompts)} fired: pick a threshold that splits them"


# -- commit horizon -------------------------------------------------------------------------------
def _stream(llm, requests, abort_on_first=(), abort_at_step=None):
    """Drive the engine step by step with DELTA outputs; returns {id: [chunks]}, {id: [logprob
    counts]}, {id: final output}. ``abort_on_first`` requests are aborted at their first output,
    ``abort_at_step[id]`` ones after that many engine steps."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    for req_id, prompt, params in requests:
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        engine.add_request(req_id, prompt, params)
    chunks, logprob_counts, finished, aborted = {}, {}, {}, set()
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        due = [r for r, n in (abort_at_step or {}).items() if n == steps and r not in finished]
        if due:
            engine.abort_request(due)
            aborted.update(due)
        for out in engine.step():
            completion = out.outputs[0]
            chunks.setdefault(out.request_id, []).append(list(completion.token_ids))
            logprob_counts.setdefault(out.request_id, []).append(len(completion.logprobs or []))
            if out.finished:
                finished[out.request_id] = out
            elif out.request_id in abort_on_first and out.request_id not in aborted:
                engine.abort_request([out.request_id])
                aborted.add(out.request_id)
    return chunks, logprob_counts, finished


def test_streamed_tokens_are_never_retracted(case):
    prompts = _prompts(case, 6, seed=5)
    specs = [
        None,
        {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 4, "min_tokens": 6},  # fires
        {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "threshold": 0.1},  # never
        {"pack": "probed", "method": "fasb", "alpha": 8.0, "backtrack": 3, "min_tokens": 3},
        {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 20},  # s > max_tokens
        {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 2, "min_tokens": 99},  # at the end
    ]
    requests = [(f"r{i}", p, greedy(MAX_NEW, s, logprobs=2)) for i, (p, s) in enumerate(zip(prompts, specs))]
    chunks, logprob_counts, finished = _stream(case.llm, requests)
    offline = case.llm.generate(prompts, [r[2] for r in requests], use_tqdm=False)
    for (req_id, _, _), spec, final in zip(requests, specs, offline):
        streamed = [t for c in chunks[req_id] for t in c]
        assert streamed == list(final.outputs[0].token_ids), req_id
        assert logprob_counts[req_id] == [len(c) for c in chunks[req_id]]
        assert finished[req_id].outputs[0].finish_reason == "length"
    # Held back while checks remain: the never-firing request's last chunk flushes s tokens.
    assert len(chunks["r2"][-1]) == 3
    assert all(len(c) <= 1 for c in chunks["r0"])


@pytest.mark.parametrize("max_backtracks", [2, 4, 8])
def test_fitted_probes_backtracking_repeatedly_stream_only_final_tokens(case, max_backtracks):
    """A fitted pack's scores vary by token, so a request can fire again right after a backtrack
    (the pattern that once retracted released tokens and killed the engine). Streamed deltas must
    add up to the final output, and both must equal the HF reference."""
    prompts = _prompts(case, 8, seed=7)
    spec = {"pack": "fitted", "method": "fasb", "alpha": 4.0, "threshold": 0.5, "backtrack": 3,
            "min_tokens": 2, "max_backtracks": max_backtracks}
    max_new = 24
    refs = [case.reference(p["prompt_token_ids"], spec, max_tokens=max_new) for p in prompts]
    # the threshold that makes about half of the checked unsteered scores fire
    spec["threshold"] = float(np.median([s for r in refs for s in r.scores[1:]]))
    refs = [case.reference(p["prompt_token_ids"], spec, max_tokens=max_new) for p in prompts]
    assert max(len(r.triggers) for r in refs) >= 2, [len(r.triggers) for r in refs]
    requests = [(f"f{max_backtracks}-{i}", p, greedy(max_new, spec, logprobs=1)) for i, p in enumerate(prompts)]
    chunks, logprob_counts, finished = _stream(case.llm, requests)
    offline = case.llm.generate(prompts, [r[2] for r in requests], use_tqdm=False)
    for (req_id, _, _), final, ref in zip(requests, offline, refs):
        streamed = [t for c in chunks[req_id] for t in c]
        assert streamed == list(final.outputs[0].token_ids) == ref.tokens, req_id
        assert logprob_counts[req_id] == [len(c) for c in chunks[req_id]]
        assert finished[req_id].outputs[0].finish_reason == "length"


def test_stop_string_on_the_final_sequence(case):
    """Stop strings are matched on released tokens, i.e. on the final (post-backtrack) sequence."""
    tokenizer = case.llm.get_tokenizer()
    prompt = _prompts(case, 1, seed=6)[0]
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "min_tokens": 4}
    full = case.llm.generate([prompt], greedy(24, spec), use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = tokenizer.decode(full.token_ids[10:11]).strip() or tokenizer.decode(full.token_ids[10:12])
    cut = text.find(stop)
    assert cut >= 0
    stopped = case.llm.generate([prompt], greedy(24, spec, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]


def test_prefix_cache_after_a_steered_backtrack_serves_vanilla_kv(case):
    prompt = random_prompts(1, case.vocab, seed=8, min_len=70, max_len=70)[0]
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 4, "min_tokens": 12}
    steered = token_ids(case.llm.generate([{"prompt_token_ids": prompt}], greedy(40, spec), use_tqdm=False))[0]
    steer_from = len(prompt) + 12 - 4 - 1
    later = prompt + steered[:36]  # an unsteered request over the steered request's whole sequence
    cached = case.llm.generate([{"prompt_token_ids": later}], greedy(8, logprobs=2), use_tqdm=False)[0]
    fresh = case.llm.generate([{"prompt_token_ids": later, "cache_salt": "fresh"}], greedy(8, logprobs=2),
                              use_tqdm=False)[0]
    assert list(cached.outputs[0].token_ids) == list(fresh.outputs[0].token_ids)
    for a, b in zip(cached.outputs[0].logprobs, fresh.outputs[0].logprobs):
        assert {t: l.logprob for t, l in a.items()} == pytest.approx({t: l.logprob for t, l in b.items()}, abs=1e-5)
    # It did reuse the unsteered prefix, and nothing computed under steering.
    assert 32 <= cached.num_cached_tokens <= steer_from // 32 * 32


# -- load -------------------------------------------------------------------------------------------
def _kv_usage(llm) -> float:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:kv_cache_usage_perc")


def _engine_stats(llm) -> dict:
    from vllm_steer.integration.engine_stats import ENGINE_STATS_UTILITY

    return llm.llm_engine.engine_core.call_utility(ENGINE_STATS_UTILITY)


def test_the_start_up_check_ran_in_the_spawned_engine_core(case):
    """The check that every worker steers (engine_stats.check_workers_steer) runs in the EngineCore
    process vLLM spawns, where the plugin is loaded inside ``EngineCore.__init__``: an ``__init__``
    wrapper would never run there, so a runner without the hooks would serve requests unsteered."""
    from vllm.v1.engine.core_client import InprocClient

    assert not isinstance(case.llm.llm_engine.engine_core, InprocClient)  # a separate EngineCore process
    assert _engine_stats(case.llm)["workers_checked"] == 1


def _counter(llm, name) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def _mixed_load_leaks_nothing(case, small, num_requests: int) -> None:
    """``num_requests`` concurrent requests (vanilla, ITI, FASB that backtracks, FASB aborted around
    its backtrack, data-dependent FASB with fixed and per-step strengths) on ``small``, an engine
    whose KV cache holds a fraction of them: every surviving request gets the roomy engine's tokens,
    requests get preempted, and every KV block comes back."""
    small.generate([{"prompt_token_ids": [5, 6, 7]}], greedy(2), use_tqdm=False)
    idle = _kv_usage(small)
    prompts = _prompts(case, num_requests, seed=9)
    kinds = ["vanilla", "iti", "fasb", "fasb_abort", "fasb_probed", "fasb_paper", "fasb_fitted"]
    requests, expected_kind = [], {}
    for i, prompt in enumerate(prompts):
        kind = kinds[i % len(kinds)]
        spec = {
            "vanilla": None,
            "iti": {"pack": "probed", "method": "iti", "alpha": 1.0 + i % 7},
            "fasb": {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 1 + i % 6,
                     "min_tokens": 2 + i % 9},
            "fasb_abort": {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 5, "min_tokens": 5},
            "fasb_probed": {"pack": "probed", "method": "fasb", "alpha": 8.0, "backtrack": 3, "min_tokens": 3},
            "fasb_paper": {"pack": "probed", "method": "fasb", "alpha": 8.0, "backtrack": 3, "min_tokens": 3,
                           "threshold": 0.6, "strength": "paper"},
            # varying scores, backtracks that fire again right after one another (up to 8)
            "fasb_fitted": {"pack": "fitted", "method": "fasb", "alpha": 4.0, "threshold": 0.5,
                            "backtrack": 1 + i % 4, "min_tokens": 1 + i % 3, "max_backtracks": 2 + i % 7,
                            **({"strength": "paper"} if i % 2 else {})},
        }[kind]
        requests.append((f"load{i}", prompt, greedy(24, spec)))
        expected_kind[f"load{i}"] = kind
    preemptions_before = _counter(small, "vllm:num_preemptions")
    aborting = sorted((r for r, k in expected_kind.items() if k == "fasb_abort"), key=lambda r: int(r[4:]))
    # Half are aborted at their first output (they release nothing before the backtrack, so
    # that is while they regenerate), half at spread-out engine steps (waiting, preempted,
    # regenerating).
    at_first = set(aborting[::2])
    at_step = {r: 8 + 5 * k for k, r in enumerate(aborting[1::2])}
    chunks, _, finished = _stream(small, requests, abort_on_first=at_first, abort_at_step=at_step)
    aborting = set(aborting)
    survivors = [r for r in requests if r[0] not in aborting]
    assert set(finished) >= {r[0] for r in survivors}
    streamed = {r: [t for c in chunks[r] for t in c] for r in chunks}
    # Every finished request got its full length; every token equals the same request run in a
    # roomy engine (FASB ones included: the roomy engine's FASB is checked against HF above).
    roomy = token_ids(case.llm.generate([r[1] for r in survivors], [r[2] for r in survivors], use_tqdm=False))
    assert [streamed[r[0]] for r in survivors] == roomy
    bad = [(r[0], len(t), r[2].extra_args) for r, t in zip(survivors, roomy) if len(t) != 24]
    assert not bad, bad[:5]
    assert _counter(small, "vllm:num_preemptions") > preemptions_before
    # Backtracks keep their request running (rolled back in place); the preemption fallback is left
    # for a request KV pressure preempted while its step was in flight (async scheduling).
    stats = _engine_stats(small)
    assert stats["backtracks_in_place"] > 0
    assert stats["backtracks_in_place"] + stats["backtracks_by_preemption"] == stats["backtracks"]
    # The KV cache is small enough that the non-FASB requests alone get preempted.
    plain = [r for r in survivors if expected_kind[r[0]] in ("vanilla", "iti")]
    before = _counter(small, "vllm:num_preemptions")
    again = token_ids(small.generate([r[1] for r in plain], [r[2] for r in plain], use_tqdm=False))
    assert _counter(small, "vllm:num_preemptions") > before
    assert again == [streamed[r[0]] for r in plain]
    # The engine still serves, and every KV block is back.
    after = small.generate([{"prompt_token_ids": [5, 6, 7]}], greedy(2), use_tqdm=False)
    assert len(after[0].outputs[0].token_ids) == 2
    assert _kv_usage(small) == pytest.approx(idle, abs=1e-9)


def _small_engine(case, **overrides):
    """An engine with a KV cache too small for the load. Eager: torch.compile is covered by ``case``'s
    engine, and the load tests are about scheduling."""
    return make_llm(case.path, packs=list(case.packs.values()), block_size=32, num_gpu_blocks_override=14,
                    disable_log_stats=False, enforce_eager=True, **overrides)


def test_mixed_load_with_kv_pressure_leaks_nothing(case):
    small = _small_engine(case)
    try:
        _mixed_load_leaks_nothing(case, small, 220)
    finally:
        close_llm(small)


@pytest.fixture
def async_scheduling_on_cpu(monkeypatch):
    """vLLM's CPU platform turns async scheduling off; put it back on for engines built here. The
    V1 runner then runs one step ahead of the scheduler (AsyncScheduler), as on CUDA by default."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        original(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))


def test_async_scheduling_backtracks_like_sync_and_leaks_nothing(case, async_scheduling_on_cpu):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    small = _small_engine(case)
    try:
        config = small.llm_engine.vllm_config
        assert config.scheduler_config.async_scheduling
        assert issubclass(config.scheduler_config.get_scheduler_cls(), AsyncScheduler)
        _mixed_load_leaks_nothing(case, small, 90)
    finally:
        close_llm(small)
