"""The OpenAI-compatible server with the plugin: a real ``vllm serve`` process on loopback, driven by
the real ``openai`` client (and plain HTTP where status codes matter).

One server for the module (start-up takes most of a minute on CPU), one offline ``LLM`` on the same
model and packs as the reference for greedy outputs.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import close_llm, make_llm
from served_process import SERVED_NAME, free_port, metric, post_completion, server_command, start_server
from vllm_steer.pack import build_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

README = Path(__file__).resolve().parents[1] / "README.md"
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, block_size=32, enforce_eager=True)
CONSTANT_P = 0.3  # the "crafted" pack's probes score every token at this P(desired)
PROMPTS = ["The capital of France is", "hello world, this is", "Is the earth flat?"]


def _scale_out_flag() -> tuple[str, ...]:
    """vLLM 0.32 serves the scale-out routes (/inference/v1/generate, render) only with this flag;
    0.26 always serves them and has no such flag."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("vllm.entrypoints.launchers.cli_args")
    except ModuleNotFoundError:  # no vllm.entrypoints.launchers package at all
        spec = None
    known = spec is not None and "enable_scale_out" in Path(spec.origin).read_text()
    return ("--enable-scale-out",) if known else ()


def _server_command(entry: str, model: Path, packs: Path, port: int) -> list[str]:
    # with the scale-out routes, so the route walk below meets them too
    extra = _scale_out_flag() if entry == "vllm serve" else ()
    return server_command(entry, model, packs, port, ENGINE_ARGS, extra)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    shape = shape_of_checkpoint(model)
    folder = tmp_path_factory.mktemp("served_packs")
    truthful = random_pack(shape, "truthful", num_heads_selected=6, with_probes=True, seed=11, sigma_scale=4.0)
    # metadata as a fit on this machine might have written it: the endpoint must not show the path
    truthful = build_pack(truthful.manifest.model_copy(update={"metadata": {
        **truthful.manifest.metadata, "dataset": str(folder / "private" / "tqa.jsonl")}}), truthful.tensors())
    crafted = with_constant_probes(truthful, CONSTANT_P, name="crafted")
    plain = random_pack(shape, "plain", num_heads_selected=3, seed=5)  # ITI without probes
    packs = {name: save_pack(folder / f"{name}.safetensors", pack)
             for name, pack in (("truthful", truthful), ("crafted", crafted), ("plain", plain))}
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(_server_command("vllm serve", model, folder, port), model, packs, port, log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(served):
    llm = make_llm(served.model, packs=list(served.packs.values()), **{k: v for k, v in ENGINE_ARGS.items()
                                                                        if k not in ("dtype", "max_model_len",
                                                                                     "max_num_seqs", "seed")})
    yield llm
    close_llm(llm)


def _offline_params(steering, max_tokens=12):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args={"steering": steering} if steering else None)


FASB_FIRES = {"pack": "crafted", "method": "fasb", "alpha": 8.0, "threshold": 0.5, "backtrack": 4, "min_tokens": 6}


def test_packs_endpoint_lists_the_loaded_packs(served):
    body = httpx.get(served.url + "/v1/steering/packs", timeout=30).json()
    packs = {p["name"]: p for p in body["data"]}
    assert sorted(packs) == ["crafted", "plain", "truthful"]
    assert packs["truthful"]["methods"] == ["iti", "fasb"] and packs["plain"]["methods"] == ["iti"]
    assert packs["truthful"]["num_heads_selected"] == 6 and packs["truthful"]["has_probes"] is True
    shape = shape_of_checkpoint(served.model)
    assert packs["plain"]["model"] == shape.model_dump()
    assert packs["truthful"]["metadata"]["seed"] == 11
    assert "source" not in json.dumps(packs["plain"]["model"]) and str(served.packs["plain"]) not in json.dumps(body)
    assert packs["truthful"]["metadata"]["dataset"] == "tqa.jsonl" and str(served.packs["plain"].parent) not in json.dumps(body)
    # the start-up log names each loaded pack with its methods and layers
    log = served.log.read_text()
    for name in ("truthful", "crafted", "plain"):
        assert f"loaded steer pack '{name}': methods" in log
    # packs are managed live only with --steering-admin-key (tests/test_live_packs.py)
    upload = httpx.post(served.url + "/v1/steering/packs", content=served.packs["plain"].read_bytes(), timeout=30)
    assert upload.status_code == 403 and "--steering-admin-key" in upload.json()["error"]["message"]
    assert httpx.delete(served.url + "/v1/steering/packs/plain", timeout=30).status_code == 403


def test_completions_match_offline_llm(served, offline):
    client = served.client()
    specs = [
        None,
        {"pack": "truthful", "method": "iti", "alpha": 8.0},
        {"pack": "plain", "alpha": -6.0, "prompt_positions": "none"},
        FASB_FIRES,
        [{"pack": "truthful", "method": "iti", "alpha": 8.0}, {"pack": "plain", "alpha": -6.0}],  # a composition
        [FASB_FIRES, {"pack": "plain", "alpha": 4.0}],
    ]
    steered_differs = False
    for spec in specs:
        for prompt in PROMPTS:
            extra = {"ignore_eos": True, "return_token_ids": True}
            if spec is not None:
                extra["steering"] = spec
            out = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body=extra)
            ref = offline.generate([prompt], _offline_params(spec), use_tqdm=False)[0].outputs[0]
            got = out.choices[0]
            assert got.token_ids == list(ref.token_ids), (spec, prompt)
            assert got.text == ref.text
            if spec is not None:
                plain = offline.generate([prompt], _offline_params(None), use_tqdm=False)[0].outputs[0]
                steered_differs |= list(plain.token_ids) != got.token_ids
    assert steered_differs  # the steered cases are not the unsteered tokens in disguise

    # the flat vllm_xargs form is the same request
    flat = client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "vllm_xargs": {"steering_pack": "truthful", "steering_alpha": 8.0}},
    )
    ref = offline.generate([PROMPTS[0]], _offline_params(specs[1]), use_tqdm=False)[0].outputs[0]
    assert flat.choices[0].token_ids == list(ref.token_ids)
    # and a composition in vllm_xargs is one JSON string
    flat = client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"steering_json": json.dumps(specs[-1])}},
    )
    ref = offline.generate([PROMPTS[0]], _offline_params(specs[-1]), use_tqdm=False)[0].outputs[0]
    assert flat.choices[0].token_ids == list(ref.token_ids)


def test_chat_completions_match_offline_llm(served, offline):
    client = served.client()
    messages = [{"role": "user", "content": "Is the earth flat?"}]
    for spec in (None, {"pack": "truthful", "alpha": 8.0}):
        extra = {"ignore_eos": True, "return_token_ids": True, **({"steering": spec} if spec else {})}
        out = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0,
                                             extra_body=extra)
        ref = offline.chat(messages, _offline_params(spec), use_tqdm=False)[0].outputs[0]
        assert out.choices[0].token_ids == list(ref.token_ids)
        assert out.choices[0].message.content == ref.text


def test_streamed_fasb_backtracking_equals_the_non_streamed_result(served, offline):
    client = served.client()
    before = served.metrics()
    extra = {"ignore_eos": True, "return_token_ids": True, "steering": FASB_FIRES}
    for prompt in PROMPTS[:2]:
        whole = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body=extra)
        text, ids = "", []
        for chunk in client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                               stream=True, extra_body=extra):
            for choice in chunk.choices:
                text += choice.text
                ids += choice.token_ids or []
        assert ids == whole.choices[0].token_ids and text == whole.choices[0].text
        assert len(ids) == 16  # nothing retracted reached the client, nothing is missing
        ref = offline.generate([prompt], _offline_params(FASB_FIRES, 16), use_tqdm=False)[0].outputs[0]
        assert ids == list(ref.token_ids)
    after = served.metrics()
    # every request fires once (constant P = 0.3 < 0.5 at G = 6), dropping 4 tokens: 2 prompts x 2 calls
    assert after["vllm_steer:backtracks_total"] - before["vllm_steer:backtracks_total"] == 4
    assert after["vllm_steer:recomputed_tokens_total"] - before["vllm_steer:recomputed_tokens_total"] == 16
    assert after['vllm_steer:requests_total{method="fasb"}'] - before.get(
        'vllm_steer:requests_total{method="fasb"}', 0.0) == 4
    # one observation per finished FASB request: each recomputed 4 tokens
    count = "vllm_steer:recomputed_tokens_per_request_count"
    assert after[count] - before.get(count, 0.0) == 4
    le4 = 'vllm_steer:recomputed_tokens_per_request_bucket{le="4"}'
    le2 = 'vllm_steer:recomputed_tokens_per_request_bucket{le="2"}'
    assert (after[le4] - before.get(le4, 0.0)) - (after[le2] - before.get(le2, 0.0)) == 4
    assert after["vllm_steer:failed_requests_total"] == 0


BAD_REQUESTS = [
    ({"steering": {"pack": "truthful", "alpha": "strong"}}, "steering.alpha"),
    ({"steering": {"pack": "nope", "alpha": 1.0}}, "steering.pack"),
    ({"steering": {"pack": "truthful", "method": "telepathy"}}, "steering.method"),
    ({"steering": {"pack": "plain", "method": "fasb", "alpha": 4.0}}, "steering.method"),  # no probes
    ({"steering": {"pack": "truthful", "alpha": 1.0, "heads": [[99, 0]]}}, "steering.heads"),
    ({"steering": {"pack": "truthful", "alpha": 1.0, "colour": "red"}}, "steering.colour"),
    ({"steering": "truthful"}, "steering"),
    ({"steering": {"pack": "truthful"}, "vllm_xargs": {"steering_alpha": 2.0}}, "steering"),
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_alpha": "x"}}, "steering_alpha"),
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_heads": [0, 1, 2]}}, "steering_heads"),
    ({"vllm_xargs": {"steering_pack": "nope"}}, "steering_pack"),  # checked against the packs: flat key
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_heads": [99, 0]}}, "steering_heads"),
    ({"steering": {"pack": "truthful", "alpha": "8"}}, "steering.alpha"),  # strict types
    ({"steering": {"pack": "truthful", "layers": ["2"]}}, "steering.layers"),
    ({"steering": {"method": "iti"}}, "steering.pack"),  # cross-field rules name their field
    ({"steering": {"pack": "truthful", "alpha": 1.0, "x" * 100_000: 1}}, None),  # echo capped (below)
    # operator limits (the defaults: 8 backtracks, 64 tokens each, 256 in all)
    ({"steering": {**{"pack": "truthful", "method": "fasb"}, "max_backtracks": 64, "backtrack": 1}},
     "steering.max_backtracks"),
    ({"steering": {"pack": "truthful", "method": "fasb", "backtrack": 1024}}, "steering.backtrack"),
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_method": "fasb", "steering_backtrack": 64,
                     "steering_max_backtracks": 8}}, "steering_max_backtracks"),
    ({"steering": [{"pack": "truthful"}, {"pack": "nope"}]}, "steering[1].pack"),
    ({"steering": [{"pack": "crafted", "method": "fasb"}, {"pack": "truthful", "method": "fasb"}]},
     "steering[1].method"),
    ({"steering": [{"pack": "plain"}, {"pack": "truthful", "method": "fasb", "backtrack": 1024}]},
     "steering[1].backtrack"),
    ({"vllm_xargs": {"steering_json": json.dumps([{"pack": "plain"}, {"pack": "plain", "alpha": "x"}])}},
     "steering_json[1].alpha"),
    ({"vllm_xargs": {"steering_json": "{"}}, "steering_json"),
    # CAST conditions: unknown pack, not a condition pack, a method it cannot gate, members disagreeing
    ({"steering": {"pack": "truthful", "condition": "nope"}}, "steering.condition.pack"),
    ({"vllm_xargs": {"steering_pack": "truthful", "steering_condition": "plain"}}, "steering_condition.pack"),
    ({"steering": {"pack": "truthful", "method": "fasb", "condition": "plain"}}, "steering.condition"),
    ({"steering": [{"pack": "plain", "condition": "x"}, {"pack": "truthful"}]}, "steering[1].condition"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_specs_get_http_400_naming_the_field(served, endpoint, stream):
    base = ({"prompt": "hello"} if endpoint == "completions"
            else {"messages": [{"role": "user", "content": "hello"}]})
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for fields, param in BAD_REQUESTS:
            body = {"model": SERVED_NAME, "max_tokens": 4, "stream": stream, **base, **fields}
            response = http.post(path, json=body)
            assert response.status_code == 400, (str(fields)[:200], response.text[:500])
            assert len(response.content) < 2000  # values and keys are quoted back cut short
            error = response.json()["error"]
            if param is None:
                continue
            assert error["param"] == param, (fields, error)
            assert param in error["message"]
        good = http.post(path, json={"model": SERVED_NAME, "max_tokens": 4, **base,
                                     "steering": {"pack": "truthful", "alpha": 2.0}})
        assert good.status_code == 200


def test_beam_search_with_steering_is_refused(served):
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path, base in (("/v1/completions", {"prompt": "hello"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):
            body = {"model": SERVED_NAME, "max_tokens": 4, "use_beam_search": True, "n": 2, **base}
            for steering in ({"steering": {"pack": "truthful", "alpha": 2.0}},
                             {"vllm_xargs": {"steering_pack": "truthful"}}):
                response = http.post(path, json={**body, **steering})
                assert response.status_code == 400, response.text
                assert response.json()["error"]["param"] == "use_beam_search"
            assert http.post(path, json=body).status_code == 200  # plain beam search still works


def test_every_route_that_does_not_steer_refuses_steering_requests(served):
    """Walks the running server's own route list, so a route a future vLLM adds is covered too."""
    from vllm_steer.integration.route_guard import STEERING_ROUTES

    schema = httpx.get(served.url + "/openapi.json", timeout=30).json()
    posts = sorted(path for path, ops in schema["paths"].items() if "post" in ops)
    assert STEERING_ROUTES <= set(posts)
    assert {"/v1/responses", "/v1/messages", "/generative_scoring", "/inference/v1/generate"} <= set(posts)
    forms = [
        ({"steering": {"pack": "truthful", "alpha": 2.0}}, "steering"),
        ({"steering": {"pack": "nope", "alpha": "abc"}}, "steering"),  # refused before any validation
        ({"vllm_xargs": {"steering_pack": "truthful", "steering_alpha": 2.0}}, "vllm_xargs.steering_pack"),
        ({"sampling_params": {"max_tokens": 2, "extra_args": {"steering": {"pack": "truthful"}}}},
         "sampling_params.extra_args.steering"),
    ]
    base = {"model": SERVED_NAME, "prompt": "hi", "input": "hi", "max_tokens": 2, "token_ids": [5, 6],
            "messages": [{"role": "user", "content": "hi"}]}
    refused = 0
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path in posts:
            if path in STEERING_ROUTES:
                continue
            url = re.sub(r"\{[^}]+\}", "x", path)
            for fields, param in forms:
                for stream in (False, True):
                    response = http.post(url, json={**base, **fields, "stream": stream})
                    assert response.status_code == 400, (path, fields, response.status_code, response.text[:300])
                    error = response.json()["error"]
                    assert error["param"] == param and url in error["message"], (path, error)
                    refused += 1
        # the same bodies without steering reach the routes as before (the guard is transparent)
        assert http.post("/v1/responses", json={"model": SERVED_NAME, "input": "hi", "max_output_tokens": 4}).status_code == 200
        assert http.post("/tokenize", json={"model": SERVED_NAME, "prompt": "hi"}).json()["tokens"]
        generate = http.post("/inference/v1/generate", json={
            "model": SERVED_NAME, "token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2}})
        assert generate.status_code == 200, generate.text
    assert refused >= 8 * len(forms) * 2
    assert served.proc.poll() is None


def test_bounded_load_of_mixed_requests_leaves_the_server_idle_and_clean(served):
    idle_before = served.metrics()
    assert metric(idle_before, "vllm:kv_cache_usage_perc") == 0.0
    kinds = ["plain", "iti", "fasb", "fasb_probed", "abort", "chat_fasb"]
    specs = {
        "plain": None,
        "iti": {"pack": "truthful", "alpha": 6.0},
        "fasb": FASB_FIRES,
        "fasb_probed": {"pack": "truthful", "method": "fasb", "alpha": 6.0, "threshold": 0.6, "backtrack": 3,
                        "min_tokens": 3},
        "abort": FASB_FIRES,
        "chat_fasb": FASB_FIRES,
    }

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
        kind = kinds[i % len(kinds)]
        body = {"model": SERVED_NAME, "max_tokens": 8 + i % 13, "temperature": 0, "ignore_eos": True}
        if specs[kind] is not None:
            body["steering"] = specs[kind]
        if kind == "chat_fasb":
            body["messages"] = [{"role": "user", "content": PROMPTS[i % 3]}]
            r = await http.post("/v1/chat/completions", json=body)
            return kind, r.status_code
        body["prompt"] = PROMPTS[i % 3] + " " * (i % 4)
        return kind, await post_completion(http, body, hang_up=kind == "abort")

    async def run_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=600, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(120)))

    results = asyncio.run(run_all())
    assert all(code == 200 for _, code in results), [r for r in results if r[1] != 200]
    # back to idle: no request running or waiting, every KV block free again, no slot held
    m = served.wait_until_idle()
    assert served.is_idle(m), {k: v for k, v in m.items() if "running" in k or "kv_cache_usage" in k or "slots" in k}
    assert m["vllm_steer:backtracks_total"] > idle_before["vllm_steer:backtracks_total"]
    assert served.proc.poll() is None
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


def _readme_example(tag: str) -> str:
    text = README.read_text()
    marker = f"<!-- tested-example: {tag} -->"
    assert marker in text, f"README lost its {tag} example"
    block = text.split(marker, 1)[1]
    match = re.search(r"```\w*\n(.*?)```", block, re.S)
    return match.group(1).replace("localhost:8000", f"127.0.0.1:{{port}}")


def test_readme_serving_examples_run_against_the_server(served):
    curl = _readme_example("curl").replace("{port}", str(served.port))
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["choices"][0]["finish_reason"] in ("length", "stop") and body["usage"]["completion_tokens"] > 0

    script = _readme_example("python").replace("{port}", str(served.port))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    non_streamed = served.client().chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Is the earth flat?"}], max_tokens=24,
        temperature=0,
        extra_body={"steering": {"pack": "truthful", "method": "fasb", "alpha": 8, "threshold": 0.5, "backtrack": 4}},
    )
    assert done.stdout.rstrip("\n") == non_streamed.choices[0].message.content


def test_the_api_server_module_takes_the_flags_and_a_bad_pack_stops_start_up(served, tmp_path):
    folder = tmp_path / "packs"
    folder.mkdir()
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    cmd = _server_command("python -m", served.model, folder, free_port())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "broken.safetensors" in done.stdout + done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(_server_command("python -m", served.model, empty, free_port()), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "holds no *.safetensors steer pack" in done.stdout + done.stderr
