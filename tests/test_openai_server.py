"""The OpenAI-compatible server with the plugin: a real ``vllm serve`` process on loopback, driven by
the real ``openai`` client (and plain HTTP where status codes matter).

One server for the module (start-up takes most of a minute on CPU), one offline ``LLM`` on the same
model and packs as the reference for greedy outputs.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import close_llm, make_llm
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

README = Path(__file__).resolve().parents[1] / "README.md"
SERVED_NAME = "demo"  # the README examples' model name
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, block_size=32, enforce_eager=True)
CONSTANT_P = 0.3  # the "crafted" pack's probes score every token at this P(desired)
PROMPTS = ["The capital of France is", "hello world, this is", "Is the earth flat?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(entry: str, model: Path, packs: Path, port: int) -> list[str]:
    flags = ["--steering-plugin", "--steering-packs", str(packs), "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", SERVED_NAME]
    for key, value in ENGINE_ARGS.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    if entry == "vllm serve":
        return [str(Path(sys.executable).parent / "vllm"), "serve", str(model), *flags]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *flags]


class Served:
    def __init__(self, model: Path, packs: dict[str, Path], port: int, proc, log: Path):
        self.model, self.packs, self.port, self.proc, self.log = model, packs, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    shape = shape_of_checkpoint(model)
    folder = tmp_path_factory.mktemp("served_packs")
    truthful = random_pack(shape, "truthful", num_heads_selected=6, with_probes=True, seed=11, sigma_scale=4.0)
    crafted = with_constant_probes(truthful, CONSTANT_P, name="crafted")
    plain = random_pack(shape, "plain", num_heads_selected=3, seed=5)  # ITI without probes
    packs = {name: save_pack(folder / f"{name}.safetensors", pack)
             for name, pack in (("truthful", truthful), ("crafted", crafted), ("plain", plain))}
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(_server_command("vllm serve", model, folder, port), stdout=sink,
                                stderr=subprocess.STDOUT)
    server = Served(model, packs, port, proc, log)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vllm serve did not come up in 300 s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def test_completions_match_offline_llm(served, offline):
    client = served.client()
    specs = [
        None,
        {"pack": "truthful", "method": "iti", "alpha": 8.0},
        {"pack": "plain", "alpha": -6.0, "prompt_positions": "none"},
        FASB_FIRES,
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
            assert response.status_code == 400, (fields, response.text)
            error = response.json()["error"]
            assert error["param"] == param, (fields, error)
            assert param.split(".")[-1].split("_")[-1] in error["message"]
        good = http.post(path, json={"model": SERVED_NAME, "max_tokens": 4, **base,
                                     "steering": {"pack": "truthful", "alpha": 2.0}})
        assert good.status_code == 200


def _metric(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if re.fullmatch(re.escape(name) + r"(\{.*\})?", k))


def test_bounded_load_of_mixed_requests_leaves_the_server_idle_and_clean(served):
    idle_before = served.metrics()
    assert _metric(idle_before, "vllm:kv_cache_usage_perc") == 0.0
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
        if kind == "abort":  # a streaming client that hangs up after its first event
            async with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 200, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
                return kind, r.status_code
        r = await http.post("/v1/completions", json=body)
        return kind, r.status_code

    async def run_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=600, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(120)))

    results = asyncio.run(run_all())
    assert all(code == 200 for _, code in results), [r for r in results if r[1] != 200]
    # back to idle: no request running or waiting, every KV block free again, no slot held
    deadline = time.monotonic() + 60
    while True:
        m = served.metrics()
        settled = (_metric(m, "vllm:num_requests_running") == 0 and _metric(m, "vllm:num_requests_waiting") == 0
                   and _metric(m, "vllm:kv_cache_usage_perc") == 0.0 and m["vllm_steer:slots_in_use"] == 0)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert settled, {k: v for k, v in m.items() if "running" in k or "kv_cache_usage" in k or "slots" in k}
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
    cmd = _server_command("python -m", served.model, folder, _free_port())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "broken.safetensors" in done.stdout + done.stderr
