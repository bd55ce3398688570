"""FASB backtracks in place: the request keeps running, its KV rolls back to the first steered
position (vllm_steer/integration/kv_rollback.py) and the next step recomputes only that position.

Each test runs on engines with prefix caching on and off, with synchronous and async scheduling
(engines shared per module, in this process so the scheduler's counters can be read directly).
Prefix-cache safety is checked from the outside: a block whose contents a backtrack rewrites under
steering is never served under its old hash, and a block shared with another request is never
written in place.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

BLOCK = 32
ENGINES = [("prefix-cache", "sync"), ("no-prefix-cache", "sync"), ("prefix-cache", "async"),
           ("no-prefix-cache", "async")]


class Engine:
    def __init__(self, llm, caching: bool, hf, raw, vocab):
        self.llm, self.caching, self.hf, self.raw, self.vocab = llm, caching, hf, raw, vocab

    @property
    def scheduler(self):
        return self.llm.llm_engine.engine_core.engine_core.scheduler

    def stats(self) -> dict:
        from vllm_steer.integration.scheduler import scheduler_stats

        return scheduler_stats(self.scheduler)

    def metric(self, name: str) -> float:
        return sum(m.value for m in self.llm.get_metrics() if m.name == name)

    def reference(self, prompt, spec, max_tokens):
        from reference.hf_fasb import fasb_generate

        return fasb_generate(
            self.hf, prompt, self.raw, alpha=spec["alpha"], threshold=spec.get("threshold", 0.5),
            backtrack=spec["backtrack"], min_tokens=spec.get("min_tokens"),
            max_backtracks=spec.get("max_backtracks", 1), max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    probed = random_pack(shape, "probed", num_heads_selected=6, with_probes=True, seed=11, sigma_scale=4.0)
    pack = save_pack(tmp_path_factory.mktemp("rollback_packs") / "crafted.safetensors",
                     with_constant_probes(probed, 0.3, name="crafted"))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, pack, hf, load_file(str(pack))


@pytest.fixture(scope="module", params=ENGINES, ids=lambda p: "-".join(p))
def engine(request, model):
    path, pack, hf, raw = model
    caching, scheduling = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if scheduling == "async":
            from vllm.platforms.cpu import CpuPlatform

            original = CpuPlatform.check_and_update_config.__func__

            def check_and_update_config(cls, vllm_config):
                original(cls, vllm_config)
                vllm_config.scheduler_config.async_scheduling = True

            mp.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))
        llm = make_llm(path, packs=[pack], block_size=BLOCK, enforce_eager=True, disable_log_stats=False,
                       enable_prefix_caching=caching == "prefix-cache")
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling == (scheduling == "async")
    yield Engine(llm, caching == "prefix-cache", hf, raw, hf.config.vocab_size)
    close_llm(llm)


def _logprobs(output):
    return [{t: l.logprob for t, l in step.items()} for step in output.outputs[0].logprobs]


def _same_logprobs(a, b):
    assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    for x, y in zip(_logprobs(a), _logprobs(b)):
        assert x == pytest.approx(y, abs=1e-5)


def test_a_rewritten_full_block_is_never_served_under_its_old_hash(engine):
    """70-token prompt, backtrack at 40 generated tokens keeping 20: steer_from = 89 lies inside block
    2 (positions 64-95), full and cached under its vanilla hash when the backtrack fires. Rewriting
    it in place would leave steered KV at positions 89-95 under the vanilla hash, and the later
    unsteered request over prompt + vanilla continuation (which hits blocks 0-2) would read it."""
    llm = engine.llm
    prompt = random_prompts(1, engine.vocab, seed=21, min_len=70, max_len=70)[0]
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 20, "min_tokens": 40}
    vanilla = token_ids(llm.generate([{"prompt_token_ids": prompt, "cache_salt": "ref"}], greedy(48),
                                     use_tqdm=False))[0]
    before = engine.stats()
    steered = token_ids(llm.generate([{"prompt_token_ids": prompt}], greedy(48, spec), use_tqdm=False))[0]
    after = engine.stats()
    assert steered == engine.reference(prompt, spec, 48).tokens
    assert steered[:20] == vanilla[:20] and steered != vanilla  # the backtrack fired and steered
    assert after["backtracks_in_place"] == before["backtracks_in_place"] + 1
    assert after["backtracks_by_preemption"] == before["backtracks_by_preemption"]
    if engine.caching:
        assert after["kv_copies"] > before["kv_copies"]  # block 2 was cached: copied, not rewritten
    later = prompt + vanilla[:30]
    cached = llm.generate([{"prompt_token_ids": later}], greedy(8, logprobs=3), use_tqdm=False)[0]
    fresh = llm.generate([{"prompt_token_ids": later, "cache_salt": "fresh"}], greedy(8, logprobs=3),
                         use_tqdm=False)[0]
    _same_logprobs(cached, fresh)
    if engine.caching:
        assert cached.num_cached_tokens == 3 * BLOCK  # it did read block 2 from the cache


def test_a_block_shared_with_another_request_is_never_written_in_place(engine):
    """FASB request A (64-token prompt P, keeps no generated token: steer_from = 63, the last
    position of prompt block 1) and vanilla B = P + [t] in the same batch: with prefix caching B
    shares A's two prompt blocks. A's backtrack rewrites position 63 under steering: in a copy."""
    llm = engine.llm
    prompt = random_prompts(1, engine.vocab, seed=22, min_len=64, max_len=64)[0]
    spec = {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3}
    b_prompt = prompt + [7]
    before = engine.stats()
    a, b = llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": b_prompt}],
                        [greedy(24, spec), greedy(24, logprobs=3)], use_tqdm=False)
    after = engine.stats()
    fresh = llm.generate([{"prompt_token_ids": b_prompt, "cache_salt": "fresh"}], greedy(24, logprobs=3),
                         use_tqdm=False)[0]
    _same_logprobs(b, fresh)
    assert list(a.outputs[0].token_ids) == engine.reference(prompt, spec, 24).tokens
    assert after["backtracks_in_place"] == before["backtracks_in_place"] + 1
    if engine.caching:
        assert b.num_cached_tokens == 2 * BLOCK  # B did share A's prompt blocks
        assert after["kv_copies"] >= before["kv_copies"] + 1


def test_backtracks_never_preempt_nor_re_prefill(engine):
    """A roomy engine: backtracks (restarts from the prompt, partial keeps, repeated ones, on the last
    step) preempt nothing, and the step after each schedules one token for the request."""
    llm = engine.llm
    prompts = [{"prompt_token_ids": p} for p in random_prompts(8, engine.vocab, seed=23, min_len=20, max_len=80)]
    knobs = [{"backtrack": 3}, {"backtrack": 2, "min_tokens": 6}, {"backtrack": 0, "min_tokens": 5},
             {"backtrack": 4, "min_tokens": 5, "max_backtracks": 2}, {"backtrack": 5, "min_tokens": 100},
             {"backtrack": 12, "min_tokens": 14}]
    specs = [{"pack": "crafted", "method": "fasb", "alpha": 6.0, **k} for k in knobs] + [None, None]
    preemptions = engine.metric("vllm:num_preemptions")
    before = engine.stats()
    got = token_ids(llm.generate(prompts, [greedy(20, s) for s in specs], use_tqdm=False))
    after = engine.stats()
    assert engine.metric("vllm:num_preemptions") == preemptions
    assert after["backtracks_by_preemption"] == before["backtracks_by_preemption"] == 0
    assert after["backtracks_in_place"] - before["backtracks_in_place"] == 7
    assert after["max_tokens_scheduled_after_backtrack"] == 1
    for prompt, spec, tokens in zip(prompts, specs, got):
        assert len(tokens) == 20
        if spec is not None:
            assert tokens == engine.reference(prompt["prompt_token_ids"], spec, 20).tokens


# -- the rollback plan, on vLLM's own block pool (no engine) -----------------------------------------
def _setup(num_blocks: int, num_held: int, block_size: int = 4):
    """A FullAttentionManager over a real BlockPool (caching on), a running request holding
    ``num_held`` blocks, and a scheduler around them."""
    from collections import defaultdict
    from types import SimpleNamespace

    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.request import RequestStatus

    pool = BlockPool(num_blocks, enable_caching=True, hash_block_size=block_size)
    m = FullAttentionManager.__new__(FullAttentionManager)  # only the fields a rollback touches
    m.block_size, m.block_pool = block_size, pool
    m.req_to_blocks, m.num_cached_block = defaultdict(list), {}
    m._pending_cow_copies, m.new_block_ids, m._record_new_block_ids = [], [], False
    m.req_to_blocks["r"] = pool.get_new_blocks(num_held)
    m.num_cached_block["r"] = num_held
    request = SimpleNamespace(request_id="r", status=RequestStatus.RUNNING, mm_features=None)
    scheduler = SimpleNamespace(connector=None, kv_cache_manager=SimpleNamespace(
        coordinator=SimpleNamespace(single_type_managers=[m])))
    return scheduler, request, m, pool


def _hash(block, n: int) -> None:
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    block.set_block_hash(make_block_hash_with_group_id(bytes([n]) * 32, 0))


def test_plan_keeps_a_private_block_and_frees_the_tail():
    from vllm_steer.integration import kv_rollback

    scheduler, request, m, pool = _setup(num_blocks=8, num_held=4)
    blocks = list(m.req_to_blocks["r"])
    free = pool.get_num_free_blocks()
    plan = kv_rollback.plan(scheduler, request, steer_from=6)  # block 1, offset 2
    assert [(p.keep, p.action) for p in plan.managers] == [(2, kv_rollback.KEEP)] and plan.num_copies == 0
    kv_rollback.apply(request, plan)
    assert m.req_to_blocks["r"] == blocks[:2] and pool.get_num_free_blocks() == free + 2
    assert m.num_cached_block["r"] == 1 and not m._pending_cow_copies


def test_plan_copies_a_shared_or_cached_block_and_drops_a_block_it_keeps_nothing_of():
    from vllm_steer.integration import kv_rollback

    scheduler, request, m, pool = _setup(num_blocks=8, num_held=4)
    shared = m.req_to_blocks["r"][1]
    pool.touch([shared])  # another request holds it too
    plan = kv_rollback.plan(scheduler, request, steer_from=6)
    assert [(p.keep, p.action) for p in plan.managers] == [(2, kv_rollback.COPY)] and plan.num_copies == 1
    kv_rollback.apply(request, plan)
    cow = m.req_to_blocks["r"][1]
    assert cow is not shared and m._pending_cow_copies == [(shared, cow)]
    assert shared.ref_cnt == 2 and cow.ref_cnt == 2  # both ends retained until the copy has run

    scheduler, request, m, pool = _setup(num_blocks=8, num_held=4)
    _hash(m.req_to_blocks["r"][1], 1)
    plan = kv_rollback.plan(scheduler, request, steer_from=6)
    assert [(p.keep, p.action) for p in plan.managers] == [(2, kv_rollback.COPY)]

    plan = kv_rollback.plan(scheduler, request, steer_from=8)  # block 2 starts at steer_from
    assert [(p.keep, p.action) for p in plan.managers] == [(2, kv_rollback.DROP)]
    kv_rollback.apply(request, plan)
    assert len(m.req_to_blocks["r"]) == 2 and m.num_cached_block["r"] == 2


def test_plan_without_a_free_block_evicts_a_private_cached_block_or_falls_back():
    from vllm_steer.integration import kv_rollback

    scheduler, request, m, pool = _setup(num_blocks=3, num_held=2)  # block 0 is vLLM's null block
    assert pool.get_num_free_blocks() == 0
    _hash(m.req_to_blocks["r"][1], 1)
    plan = kv_rollback.plan(scheduler, request, steer_from=6)
    assert [(p.keep, p.action) for p in plan.managers] == [(2, kv_rollback.EVICT)]
    pool.touch([m.req_to_blocks["r"][1]])
    assert "no free KV block" in kv_rollback.plan(scheduler, request, steer_from=6)


def test_plan_falls_back_to_preemption_where_it_cannot_roll_back_in_place():
    from types import SimpleNamespace

    from vllm.v1.request import RequestStatus

    from vllm_steer.integration import kv_rollback

    scheduler, request, m, pool = _setup(num_blocks=8, num_held=4)
    request.status = RequestStatus.PREEMPTED
    assert "PREEMPTED" in kv_rollback.plan(scheduler, request, steer_from=6)
    request.status = RequestStatus.RUNNING
    image = SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=5))
    request.mm_features = [image]
    assert "multimodal" in kv_rollback.plan(scheduler, request, steer_from=6)
    request.mm_features = [SimpleNamespace(mm_position=SimpleNamespace(offset=0, length=5))]
    assert isinstance(kv_rollback.plan(scheduler, request, steer_from=6), kv_rollback.RollbackPlan)
    scheduler.connector = object()
    assert "connector" in kv_rollback.plan(scheduler, request, steer_from=6)
    scheduler.connector = None
    scheduler.kv_cache_manager.coordinator.single_type_managers = [SimpleNamespace()]
    assert "full attention" in kv_rollback.plan(scheduler, request, steer_from=6)
