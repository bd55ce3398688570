"""The adversarial load, bounded and on loopback: a real server with a KV cache too small for the
load, hit at once by unsteered, ITI and FASB requests (a fitted pack's varying probes, up to 8
backtracks each), streamed and not, completions and chat, clients that hang up mid-stream, and
malformed or over-limit requests. Afterwards: no engine death, no 5xx, KV blocks and steering slots
back to idle, and every completed request equal to the same request sent again alone.

``pytest -s`` prints the counts recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import fitted_probe_pack
from served_process import SERVED_NAME, free_port, metric, server_command, start_server
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

NUM_REQUESTS = 160
# 14 blocks of 32 tokens: a few long requests fill the cache, so requests get preempted
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, block_size=32,
                   enforce_eager=True, num_gpu_blocks_override=14)
PROMPTS = ["The capital of France is", "hello world, this is", "Is the earth flat?",
           "Once upon a time in a land far away there lived a king who", "Q: What is 2 + 2? A:"]
KINDS = ["plain", "iti", "fasb_fitted", "stream_fitted", "abort", "chat_fitted", "fasb_crafted", "bad"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    shape = shape_of_checkpoint(model)
    folder = tmp_path_factory.mktemp("load_packs")
    fitted = fitted_probe_pack(model, "fitted")
    packs = {
        "fitted": save_pack(folder / "fitted.safetensors", fitted),
        "crafted": save_pack(folder / "crafted.safetensors", with_constant_probes(fitted, 0.3, name="crafted")),
        "plain": save_pack(folder / "plain.safetensors", random_pack(shape, "plain", num_heads_selected=3, seed=5)),
    }
    port = free_port()
    log = tmp_path_factory.mktemp("load_server") / "server.log"
    served = start_server(server_command("vllm serve", model, folder, port, ENGINE_ARGS), model, packs, port, log)
    yield served
    served.stop()


def _request(i: int) -> tuple[str, str, dict]:
    """(kind, path, body) of the i-th request."""
    kind = KINDS[i % len(KINDS)]
    fitted = {"pack": "fitted", "method": "fasb", "alpha": 4.0 + i % 5, "threshold": 0.5,
              "backtrack": 1 + i % 4, "min_tokens": 1 + i % 3, "max_backtracks": 2 + i % 7}
    steering = {
        "plain": None,
        "iti": {"pack": "plain", "alpha": float(1 + i % 9)},
        "fasb_fitted": fitted, "stream_fitted": fitted, "abort": fitted, "chat_fitted": fitted,
        "fasb_crafted": {"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "min_tokens": 5},
        "bad": [{"pack": "nope"}, {"pack": "fitted", "method": "fasb", "max_backtracks": 64, "backtrack": 1},
                {"pack": "fitted", "alpha": "8"}][i % 3],
    }[kind]
    body = {"model": SERVED_NAME, "max_tokens": 8 + i % 17, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    if kind == "chat_fitted":
        body["messages"] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        return kind, "/v1/chat/completions", body
    body["prompt"] = PROMPTS[i % len(PROMPTS)] + " again" * (i % 3)
    if kind in ("stream_fitted", "abort"):
        body["stream"] = True
    if kind == "abort":
        body["max_tokens"] = 120
    return kind, "/v1/completions", body


def _result(path: str, payload: dict) -> tuple[str, list[int]]:
    choice = payload["choices"][0]
    if path == "/v1/chat/completions":
        return choice["message"]["content"], choice["token_ids"]
    return choice["text"], choice["token_ids"]


async def _one(http: httpx.AsyncClient, i: int):
    kind, path, body = _request(i)
    if not body.get("stream"):
        r = await http.post(path, json=body)
        return i, kind, r.status_code, _result(path, r.json()) if r.status_code == 200 else None
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200 or kind == "abort":  # the aborting client hangs up at its first event
            async for _ in r.aiter_lines():
                break
            return i, kind, r.status_code, None
        text, ids = "", []
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["text"]
                    ids += choice.get("token_ids") or []
        return i, kind, r.status_code, (text, ids)


def test_adversarial_mixed_load_under_kv_pressure(server):
    before = server.metrics()

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=600,
                                     limits=httpx.Limits(max_connections=256)) as http:
            return await asyncio.gather(*(_one(http, i) for i in range(NUM_REQUESTS)))

    results = asyncio.run(run_all())
    codes = [code for _, _, code, _ in results]
    assert not [c for c in codes if c >= 500], "5xx answers"
    assert all((code == 400) == (kind == "bad") for _, kind, code, _ in results)
    after = server.wait_until_idle()
    assert server.is_idle(after), {k: v for k, v in after.items() if "running" in k or "kv_cache" in k or "slots" in k}
    assert server.proc.poll() is None and httpx.get(server.url + "/health", timeout=10).status_code == 200

    # every completed request equals the same request sent again alone (greedy), streamed ones too
    completed = [(i, kind, out) for i, kind, code, out in results if out is not None]
    mismatched = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i, kind, out in completed:
            _, path, body = _request(i)
            body = {**body, "stream": False}
            alone = _result(path, http.post(path, json=body).json())
            if alone != out or len(out[1]) != body["max_tokens"]:
                mismatched.append((i, kind))
    assert not mismatched, mismatched

    delta = {name: metric(after, name) - metric(before, name) for name in (
        "vllm:num_preemptions_total", "vllm_steer:backtracks_total", "vllm_steer:recomputed_tokens_total",
        "vllm_steer:failed_requests_total")}
    fitted_requests = sum(kind in ("fasb_fitted", "stream_fitted", "chat_fitted") for _, kind, _, out in results)
    print(f"\nadversarial load: {NUM_REQUESTS} requests, {codes.count(200)} x 200, {codes.count(400)} x 400, "
          f"{sum(c >= 500 for c in codes)} x 5xx, {sum(k == 'abort' for _, k, _, _ in results)} aborted streams, "
          f"{len(completed)} completed and equal to a serial rerun ({fitted_requests} fitted-pack FASB); "
          f"preemptions {delta['vllm:num_preemptions_total']:.0f}, backtracks {delta['vllm_steer:backtracks_total']:.0f}, "
          f"recomputed tokens {delta['vllm_steer:recomputed_tokens_total']:.0f}, "
          f"failed requests {delta['vllm_steer:failed_requests_total']:.0f}, engine deaths 0")
    assert delta["vllm:num_preemptions_total"] > 0  # the KV cache really was too small
    assert delta["vllm_steer:backtracks_total"] > fitted_requests  # some fire more than once
    assert delta["vllm_steer:failed_requests_total"] == 0
