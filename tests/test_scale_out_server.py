"""Steering on a scaled-out ``vllm serve``: several API-server processes (``--api-server-count 2``)
and two data-parallel engines (``--data-parallel-size 2``, with vLLM's default of two API servers).
Real servers on loopback, one per configuration (module-scoped), against a single offline engine's
greedy outputs as the reference (computed first and closed before any server starts: the machine
has 2 cores).

Each API server is a process vLLM spawns from the parsed command line; they share one listening
port, and the kernel hands each new connection to one of them. The tests open a new connection per
request and read from the server log (``--enable-log-requests``; lines carry the process id) that
both API servers took steered requests. A request's spec can only be checked where it arrives (the
parent process serves nothing), so the 400s, sent twice each over new connections, come from both.
Under data parallelism each request is sent to both engines in turn (vLLM's ``X-data-parallel-rank``
header), and the per-engine steering counters show both engines steered.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from conftest import close_llm, make_llm
from served_process import SERVED_NAME, free_port, metric, post_completion, server_command, start_server
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, block_size=32, enforce_eager=True)
PROMPTS = ["The capital of France is", "Is the earth flat?"]
MAX_TOKENS = 16
FASB_FIRES = {"pack": "crafted", "method": "fasb", "alpha": 8.0, "threshold": 0.5, "backtrack": 4, "min_tokens": 6}
SPECS = {
    "none": None,
    "iti": {"pack": "truthful", "method": "iti", "alpha": 8.0},
    "plain": {"pack": "plain", "alpha": -6.0, "prompt_positions": "none"},
    "fasb": FASB_FIRES,
}
# the same ITI request in the flat vllm_xargs form
FLAT_ITI = {"steering_pack": "truthful", "steering_method": "iti", "steering_alpha": 8.0}
CONFIGS = {
    # name -> (extra serve flags, environment, number of data-parallel engines)
    "api-server-count-2": (("--api-server-count", "2", "--enable-log-requests"), {}, 1),
    # one CPU per engine's worker (vLLM's automatic binding wants a NUMA node per rank)
    "data-parallel-size-2": (("--data-parallel-size", "2", "--enable-log-requests"), {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                             2),
}
BAD_REQUESTS = [  # checked in whichever API server receives them, streaming or not
    ({"steering": {"pack": "truthful", "alpha": "strong"}}, "steering.alpha"),
    ({"steering": {"pack": "nope", "alpha": 1.0}}, "steering.pack"),
    ({"steering": {"pack": "plain", "method": "fasb", "alpha": 4.0}}, "steering.method"),
    ({"steering": {"pack": "truthful", "alpha": 1.0, "heads": [[99, 0]]}}, "steering.heads"),
    ({"vllm_xargs": {"steering_pack": "nope"}}, "steering_pack"),
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_alpha": "x"}}, "steering_alpha"),
    ({"steering": {"pack": "truthful", "method": "fasb", "backtrack": 1024}}, "steering.backtrack"),
]


@pytest.fixture(scope="module")
def packs(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    shape = shape_of_checkpoint(model)
    folder = tmp_path_factory.mktemp("scale_out_served_packs")
    truthful = random_pack(shape, "truthful", num_heads_selected=6, with_probes=True, seed=11, sigma_scale=4.0)
    made = {"truthful": truthful, "crafted": with_constant_probes(truthful, 0.3, name="crafted"),
            "plain": random_pack(shape, "plain", num_heads_selected=3, seed=5)}
    return model, folder, {name: save_pack(folder / f"{name}.safetensors", pack) for name, pack in made.items()}


@pytest.fixture(scope="module")
def reference(packs):
    """Token ids of one offline engine for every (spec, prompt), greedy; the engine is closed before
    the servers start."""
    from vllm import SamplingParams

    model, _, files = packs
    started = time.monotonic()
    llm = make_llm(model, packs=list(files.values()), block_size=32, enforce_eager=True)
    try:
        out = {}
        for name, spec in SPECS.items():
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    extra_args={"steering": spec} if spec else None)
            for prompt, result in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
                out[name, prompt] = list(result.outputs[0].token_ids)
    finally:
        close_llm(llm)
    assert out["iti", PROMPTS[0]] != out["none", PROMPTS[0]] or out["iti", PROMPTS[1]] != out["none", PROMPTS[1]]
    print(f"single-engine reference: {time.monotonic() - started:.0f} s")
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, packs, reference, tmp_path_factory):
    model, folder, files = packs
    flags, env, engines = CONFIGS[request.param]
    port = free_port()
    log = tmp_path_factory.mktemp(f"server_{request.param}") / "server.log"
    started = time.monotonic()
    server = start_server(server_command("vllm serve", model, folder, port, ENGINE_ARGS, flags), model, files,
                          port, log, env=env)
    print(f"{request.param}: up in {time.monotonic() - started:.0f} s")
    server.engines = engines
    server.config = request.param
    yield server
    server.stop()


def _api_server_pids(log_text: str, pattern: str) -> set[str]:
    """Process ids of the log lines (``... pid=N ...``) that match ``pattern``."""
    found = set()
    for line in log_text.splitlines():
        if re.search(pattern, line):
            pid = re.search(r"pid=(\d+)", line)
            if pid:
                found.add(pid.group(1))
    return found


def _engine_headers(served, i: int) -> dict:
    """Send request i to data-parallel engine i % N (vLLM's per-request engine choice)."""
    return {"X-data-parallel-rank": str(i % served.engines)} if served.engines > 1 else {}


def test_every_api_server_built_its_registry_and_lists_the_packs(served):
    for _ in range(12):  # a new connection each time: the kernel spreads them over the API servers
        response = httpx.get(served.url + "/v1/steering/packs", timeout=30)
        assert response.status_code == 200, response.text
        assert sorted(p["name"] for p in response.json()["data"]) == ["crafted", "plain", "truthful"]
    log = served.log.read_text()
    # each API server process loaded the packs itself (the parent process, which serves nothing, too)
    # and has the route
    assert len(_api_server_pids(log, r"(?i)api_?server.*loaded steer pack 'truthful'")) == 2, log[-3000:]
    assert len(_api_server_pids(log, r"(?i)api_?server.*Route: /v1/steering/packs")) == 2, log[-3000:]


def test_every_spec_form_matches_the_single_engine(served, reference):
    started = time.monotonic()
    forms = [(name, {"steering": spec} if spec else {}) for name, spec in SPECS.items()]
    forms.append(("iti", {"vllm_xargs": FLAT_ITI}))
    i = 0
    for name, fields in forms:
        for prompt in PROMPTS:
            for _ in range(max(2, served.engines)):  # every engine (or twice, over new connections)
                body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True, **fields}
                response = httpx.post(served.url + "/v1/completions", json=body, headers=_engine_headers(served, i),
                                      timeout=120)
                i += 1
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["token_ids"] == reference[name, prompt], (name, fields, prompt)
    log = served.log.read_text()  # --enable-log-requests: each API server logs the steered requests it took
    assert len(_api_server_pids(log, r"(?i)api_?server.*Received request .*'steering'")) == 2, log[-3000:]
    print(f"{served.config}: {i} requests compared in {time.monotonic() - started:.0f} s")


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_specs_get_400_naming_the_field_from_every_api_server(served, stream):
    for fields, param in BAD_REQUESTS * 2:
        body = {"model": SERVED_NAME, "prompt": "hello", "max_tokens": 4, "stream": stream, **fields}
        response = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 400, (fields, response.text[:500])
        assert response.headers["content-type"].startswith("application/json")  # not an event stream
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"], (fields, error)


def test_streamed_fasb_backtracks_on_every_engine_and_the_metrics_sum_them(served, reference):
    before = served.metrics()
    n = 0
    for i in range(2 * max(2, served.engines)):
        prompt = PROMPTS[i % 2]
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True, "steering": FASB_FIRES}
        ids, text = [], ""
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120,
                          headers=_engine_headers(served, i // 2)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        ids += choice.get("token_ids") or []
                        text += choice["text"]
        assert ids == reference["fasb", prompt]  # nothing retracted reached the client, nothing missing
        n += 1
    # every scrape (a new connection, so either API server) reports the engines' totals, once
    scrapes = [served.metrics() for _ in range(6)]
    keys = ["vllm_steer:backtracks_total", "vllm_steer:recomputed_tokens_total",
            'vllm_steer:requests_total{method="fasb"}', "vllm_steer:recomputed_tokens_per_request_count"]
    assert all({k: s[k] for k in keys} == {k: scrapes[0][k] for k in keys} for s in scrapes)
    after = scrapes[0]
    # constant P = 0.3 < 0.5 at G = 6: every request fires once and drops 4 tokens
    assert after["vllm_steer:backtracks_total"] - before["vllm_steer:backtracks_total"] == n
    assert after["vllm_steer:recomputed_tokens_total"] - before["vllm_steer:recomputed_tokens_total"] == 4 * n
    fasb = 'vllm_steer:requests_total{method="fasb"}'
    assert after[fasb] - before.get(fasb, 0.0) == n
    assert after["vllm_steer:failed_requests_total"] == 0
    assert after["vllm_steer:slots_total"] == 16 * served.engines  # max_num_seqs per engine, summed
    per_engine = {k: v for k, v in after.items() if k.startswith("vllm_steer:requests_per_engine_total")}
    assert len(per_engine) == served.engines, per_engine
    assert all(v > 0 for v in per_engine.values()), per_engine  # every engine steered
    assert sum(per_engine.values()) == sum(v for k, v in after.items() if k.startswith("vllm_steer:requests_total{"))


def test_mixed_load_with_aborts_leaves_every_engine_idle(served):
    started = time.monotonic()
    kinds = ["plain", "iti", "fasb", "abort", "flat"]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
        kind = kinds[i % len(kinds)]
        body = {"model": SERVED_NAME, "prompt": PROMPTS[i % 2] + " " * (i % 3), "max_tokens": 6 + i % 9,
                "temperature": 0, "ignore_eos": True}
        if kind in ("iti", "fasb", "abort"):
            body["steering"] = SPECS["iti"] if kind == "iti" else FASB_FIRES
        if kind == "flat":
            body["vllm_xargs"] = FLAT_ITI
        return kind, await post_completion(http, body, hang_up=kind == "abort")

    async def run_all():
        async def fresh(i):  # a client (and connection) per request, so both API servers get some
            async with httpx.AsyncClient(base_url=served.url, timeout=300) as http:
                return await one(http, i)

        return await asyncio.gather(*(fresh(i) for i in range(30)))

    results = asyncio.run(run_all())
    assert all(code == 200 for _, code in results), [r for r in results if r[1] != 200]
    m = served.wait_until_idle()
    assert served.is_idle(m), {k: v for k, v in m.items() if "running" in k or "kv_cache_usage" in k or "slots" in k}
    per_engine_slots = {k: v for k, v in m.items() if k.startswith("vllm_steer:slots_in_use_per_engine")}
    assert len(per_engine_slots) == served.engines and not any(per_engine_slots.values()), per_engine_slots
    assert metric(m, "vllm:kv_cache_usage_perc") == 0.0 and m["vllm_steer:failed_requests_total"] == 0
    assert served.proc.poll() is None
    print(f"{served.config}: mixed load and idle in {time.monotonic() - started:.0f} s")
