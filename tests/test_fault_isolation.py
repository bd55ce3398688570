"""Defence in depth: an unexpected exception in steering code for one request fails that request
only (its client gets finish_reason "error", its KV blocks and steering slot are freed) and the
engine keeps serving the others, unchanged.

Faults are injected by patching our own functions, so the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the scheduler and the worker see the patches.
"""

from __future__ import annotations

import pytest

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from vllm_steer.engine.fasb import FasbController, FasbRequest
from vllm_steer.engine.step_planner import StepPlanner
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

MAX_NEW = 12
FAULTY_ALPHA = 7.25  # the injected faults hit only requests steering at this alpha


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("fault_packs")
    probed = random_pack(shape, "probed", num_heads_selected=4, with_probes=True, seed=3, sigma_scale=4.0)
    packs = [save_pack(folder / "probed.safetensors", probed),
             save_pack(folder / "crafted.safetensors", with_constant_probes(probed, 0.3, name="crafted"))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = make_llm(path, packs=packs, enforce_eager=True, block_size=32)
    yield llm
    close_llm(llm)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core  # in-process EngineCore


def _free_blocks(llm) -> int:
    return _core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def _settle(llm) -> None:
    """Run the engine's trailing step: the workers hear of the last finished requests there."""
    core = _core(llm)
    while core.scheduler.has_requests():
        core.step()


def _stats(llm) -> dict:
    from vllm_steer.integration.engine_stats import engine_stats

    return engine_stats(_core(llm))


GOOD = [
    None,
    {"pack": "probed", "method": "iti", "alpha": 6.0},
    {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "min_tokens": 5},
]
FAULTY = {
    "scheduler: FASB check": {"pack": "crafted", "method": "fasb", "alpha": FAULTY_ALPHA, "backtrack": 3,
                              "min_tokens": 5},
    "scheduler: commit horizon": {"pack": "crafted", "method": "fasb", "alpha": FAULTY_ALPHA, "backtrack": 3,
                                  "threshold": 0.1},
    "worker: step planner": {"pack": "probed", "method": "iti", "alpha": FAULTY_ALPHA},
    "worker: FASB update": {"pack": "crafted", "method": "fasb", "alpha": FAULTY_ALPHA, "backtrack": 3,
                            "min_tokens": 5},
}


def _inject(mp, where: str) -> None:
    def boom():
        raise RuntimeError(f"injected fault in {where}")

    if where == "scheduler: FASB check":
        original = FasbController.check

        def check(self, req_id, *args, **kwargs):
            if self.requests[req_id].spec.alpha == FAULTY_ALPHA:
                boom()
            return original(self, req_id, *args, **kwargs)

        mp.setattr(FasbController, "check", check)
    elif where == "scheduler: commit horizon":
        original = FasbRequest.releasable

        def releasable(self, finished):
            if self.spec.alpha == FAULTY_ALPHA and self.released + len(self.held_tokens) >= 4:
                boom()
            return original(self, finished)

        mp.setattr(FasbRequest, "releasable", releasable)
    elif where == "worker: step planner":
        original = StepPlanner._plan_request

        def plan_request(self, req_id, slot, extra_args_of, *args):
            steering = self.steering_of(req_id, extra_args_of)
            if steering is not None and steering.spec.alpha == FAULTY_ALPHA and args[1] > 0:
                boom()  # fails in a decode step, once the request holds its slot
            return original(self, req_id, slot, extra_args_of, *args)

        mp.setattr(StepPlanner, "_plan_request", plan_request)
    elif where == "worker: FASB update":
        original = StepPlanner.apply_update

        def apply_update(self, update, extra_args_of):
            if self.steering_of(update.req_id, extra_args_of).spec.alpha == FAULTY_ALPHA:
                boom()
            return original(self, update, extra_args_of)

        mp.setattr(StepPlanner, "apply_update", apply_update)
    else:
        raise AssertionError(where)


@pytest.mark.parametrize("where", list(FAULTY))
def test_a_fault_in_steering_code_fails_only_its_request(engine, where):
    vocab = engine.get_tokenizer().vocab_size
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, vocab, seed=21, min_len=5, max_len=12)]
    good_params = [greedy(MAX_NEW, spec, logprobs=1) for spec in GOOD]
    expected = token_ids(engine.generate(prompts[:3], good_params, use_tqdm=False))
    idle_blocks = _free_blocks(engine)
    failed_before = _stats(engine)["failed_requests"]

    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, where)
        # the faulty request sits in the middle of the batch, beside every kind of good one
        outputs = engine.generate(
            [prompts[0], prompts[3], prompts[1], prompts[2]],
            [good_params[0], greedy(MAX_NEW, FAULTY[where]), good_params[1], good_params[2]],
            use_tqdm=False,
        )
        # the engine keeps serving while the fault is still there
        again = engine.generate(prompts[:3], good_params, use_tqdm=False)

    assert outputs[1].outputs[0].finish_reason == "error", where
    assert [list(o.outputs[0].token_ids) for o in (outputs[0], outputs[2], outputs[3])] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in (outputs[0], outputs[2], outputs[3]))
    assert token_ids(again) == expected
    _settle(engine)
    stats = _stats(engine)
    assert stats["failed_requests"] == failed_before + 1
    assert stats["slots_in_use"] == 0 and _free_blocks(engine) == idle_blocks
    # and afterwards, the same request steers normally again
    healthy = engine.generate([prompts[3]], greedy(MAX_NEW, FAULTY[where]), use_tqdm=False)[0]
    assert healthy.outputs[0].finish_reason == "length" and len(healthy.outputs[0].token_ids) == MAX_NEW
