"""The plugin as a citizen of whatever vLLM is installed (CI runs this module on every vLLM leg):
every vLLM symbol the integration layer relies on is there with the parameters it expects; installing
the plugin never breaks an engine that does not steer; and when something is missing, only steering
engines refuse to start, naming it."""

from __future__ import annotations

import pytest

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from vllm_steer.errors import ConfigError
from vllm_steer.integration import compat
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack


def test_every_vllm_symbol_the_plugin_relies_on_is_there():
    import vllm

    import vllm_steer.integration as integration

    integration.install()
    assert compat.problems() == [], f"vLLM {vllm.__version__}"
    assert len(compat.REQUIRED) >= 30


def test_an_engine_or_server_without_steering_is_vllm_without_the_plugin(tiny_model, monkeypatch, tmp_path):
    import httpx

    from served_process import SERVED_NAME, free_port, start_server

    path = tiny_model("llama")
    prompts = random_prompts(4, 512, seed=5)
    params = greedy(10, logprobs=2)
    with_plugin = make_llm(path, enforce_eager=True)
    try:
        got = with_plugin.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        close_llm(with_plugin)
    # a server with the plugin installed and loaded, started without steering
    port = free_port()
    command = [str(__import__("pathlib").Path(__import__("sys").executable).parent / "vllm"), "serve", str(path),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", "float32",
               "--max-model-len", "256", "--max-num-seqs", "16", "--seed", "0", "--enforce-eager"]
    server = start_server(command, path, {}, port, tmp_path / "server.log")
    try:
        served = [httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": SERVED_NAME, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}).json()["choices"][0]["token_ids"] for p in prompts]
        refused = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": SERVED_NAME, "prompt": prompts[0], "max_tokens": 2, "steering": {"pack": "p"}})
    finally:
        server.stop()
    monkeypatch.setenv("VLLM_PLUGINS", "none")  # the engine's processes load no general plugin
    without = make_llm(path, enforce_eager=True)
    try:
        want = without.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        close_llm(without)
    assert token_ids(got) == token_ids(want) == served
    for a, b in zip(got, want):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: l.logprob for t, l in la.items()} == {t: l.logprob for t, l in lb.items()}
    # a steering field sent to that server is not silently dropped
    assert refused.status_code == 400 and "started without steering" in refused.text


@pytest.fixture
def pack_file(tiny_model, tmp_path):
    path = tiny_model("llama")
    return path, save_pack(tmp_path / "p.safetensors", random_pack(shape_of_checkpoint(path), "p", num_heads_selected=2))


def test_a_failing_patch_never_raises_into_vllm_and_only_steering_engines_refuse(pack_file, monkeypatch):
    import vllm_steer.integration as integration
    from vllm_steer.integration import prefix_cache

    def broken():
        raise AttributeError("module 'vllm.v1.core.kv_cache_utils' has no attribute 'something'")

    monkeypatch.setattr(compat, "install_failures", [])
    monkeypatch.setattr(prefix_cache, "install", broken)
    integration.install()  # vLLM calls it without a try: it must not raise
    assert compat.install_failures == [
        "vllm_steer.integration.prefix_cache.install: AttributeError: module 'vllm.v1.core.kv_cache_utils' has "
        "no attribute 'something'"]
    path, pack = pack_file
    with pytest.raises(ConfigError, match=r"cannot steer on this vLLM .*tested 0\.26\.0, 0\.32\.0.*prefix_cache"):
        make_llm(path, packs=[pack])


def test_a_missing_vllm_symbol_refuses_steering_engines_by_name(pack_file, monkeypatch):
    missing = compat.Needed("vllm.v1.core.sched.scheduler", "Scheduler.a_method_vllm_removed", ("self",))
    changed = compat.Needed("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request", ("self", "req"))
    monkeypatch.setattr(compat, "REQUIRED", (*compat.REQUIRED, missing, changed))
    compat._symbol_problems.cache_clear()
    try:
        problems = compat.problems()
        assert "vllm.v1.core.sched.scheduler.Scheduler.a_method_vllm_removed: missing" in problems
        assert any(p.startswith("vllm.v1.core.sched.scheduler.Scheduler._preempt_request: expected parameters "
                                "(self, req, ...), found (self, request, timestamp") for p in problems)
        path, pack = pack_file
        with pytest.raises(ConfigError, match="a_method_vllm_removed"):
            make_llm(path, packs=[pack])
    finally:
        monkeypatch.undo()
        compat._symbol_problems.cache_clear()


def test_a_runner_without_the_hooks_fails_start_up(pack_file, monkeypatch):
    """A model runner the plugin does not hook (Model Runner V2 forced by a config, a platform's own
    runner) would serve every request unsteered: the engine refuses to start instead."""
    from vllm_steer.integration import worker

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs here, with the patch below
    monkeypatch.setattr(worker, "_attach", lambda runner: None)
    path, pack = pack_file
    with pytest.raises(Exception) as info:
        make_llm(path, packs=[pack], enforce_eager=True)
    assert "runs a model runner without the steering hooks" in str(info.value)
