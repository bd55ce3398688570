"""Packs managed live on a real ``vllm serve``: POST / DELETE /v1/steering/packs with the admin key.

The server starts with one pack and the admin key in ``VLLM_STEER_ADMIN_KEY``, compiled (not eager),
so an upload that needed new hooks or a new graph would show. Greedy outputs are compared with the
independent HF reference (``tests/reference``) reading the uploaded pack's own file.
"""

from __future__ import annotations

import io
import json
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file

from reference.hf_composed import composed_generate, pack_heads, pack_residual
from served_process import SERVED_NAME, free_port, server_command, start_server
from vllm_steer.integration.serve_flags import ADMIN_KEY_ENV
from vllm_steer.pack import ModelShape, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import condition_pack, random_pack

KEY = "live-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, max_num_seqs=8, seed=0, block_size=32)
ROUTE = "/v1/steering/packs"
PROMPT = [17, 230, 45, 301, 99, 12]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    shape = shape_of_checkpoint(model)
    folder = tmp_path_factory.mktemp("live_start")
    base = save_pack(folder / "base.safetensors", random_pack(shape, "base", num_heads_selected=2,
                                                              residual_layers=(2,), seed=3))
    port = free_port()
    log = tmp_path_factory.mktemp("live_server") / "server.log"
    command = server_command("vllm serve", model, folder, port, ENGINE_ARGS, ("--steering-max-pack-mib", "1"))
    server = start_server(command, model, {"base": base}, port, log, env={ADMIN_KEY_ENV: KEY})
    server.hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    server.shape = shape
    server.files = tmp_path_factory.mktemp("live_uploads")
    yield server
    server.stop()


def _pack_bytes(served, pack) -> tuple[bytes, dict]:
    path = save_pack(served.files / f"{pack.name}-{pack.digest()[:8]}.safetensors", pack)
    return path.read_bytes(), load_file(str(path))


def _complete(served, steering, max_tokens=10) -> httpx.Response:
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "steering": steering}
    return httpx.post(served.url + "/v1/completions", json=body, timeout=120)


def _tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def _compile_lines(served) -> int:
    """Server log lines about compiling (the start-up's warm-up and compiled-graph lines among them)."""
    return sum("compil" in line.lower() for line in served.log.read_text().splitlines())


def test_an_uploaded_pack_steers_the_next_request_without_restart_or_recompile(served):
    pack = random_pack(served.shape, "live", num_heads_selected=4, residual_layers=(1, 3), with_probes=True,
                       seed=21, sigma_scale=4.0)
    data, raw = _pack_bytes(served, pack)
    iti = {"pack": "live", "alpha": 3.0}
    refused = _complete(served, iti)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "steering.pack"
    compiles = _compile_lines(served)
    assert compiles > 0  # the start-up compiled the model
    added = httpx.post(served.url + ROUTE, content=data, headers={**AUTH, "Content-Type": "application/octet-stream"},
                       timeout=120)
    assert added.status_code == 200, added.text
    assert added.json()["name"] == "live" and added.json()["methods"] == ["iti", "residual", "fasb"]
    listed = httpx.get(served.url + ROUTE, timeout=30).json()["data"]
    assert sorted(p["name"] for p in listed) == ["base", "live"]
    # ITI, residual and a composition with the start-up pack, each as the HF reference steers them
    got = _tokens(_complete(served, iti))
    assert got == composed_generate(served.hf, PROMPT, 10, [{"heads": pack_heads(raw), "alpha": 3.0}])
    got = _tokens(_complete(served, {"pack": "live", "method": "residual", "alpha": 1.5}))
    assert got == composed_generate(served.hf, PROMPT, 10, [{"residual": pack_residual(raw), "alpha": 1.5}])
    base = load_file(str(served.packs["base"]))
    composed = [iti, {"pack": "base", "method": "residual", "alpha": -2.0}]
    got = _tokens(_complete(served, composed))
    assert got == composed_generate(served.hf, PROMPT, 10, [{"heads": pack_heads(raw), "alpha": 3.0},
                                                            {"residual": pack_residual(base), "alpha": -2.0}])
    assert got != _tokens(_complete(served, None))
    # its probes serve FASB too
    assert _tokens(_complete(served, {"pack": "live", "method": "fasb", "alpha": 4.0, "threshold": 0.0}))
    assert _compile_lines(served) == compiles  # nothing compiled since: the same graph served it


def _bad(served, data: bytes, headers=AUTH) -> httpx.Response:
    return httpx.post(served.url + ROUTE, content=data, headers={**headers, "Content-Type": "application/octet-stream"},
                      timeout=60)


def test_bad_uploads_are_refused_naming_why_and_the_server_serves_on(served):
    good, _ = _pack_bytes(served, random_pack(served.shape, "fine", num_heads_selected=2, seed=5))
    assert _bad(served, good, headers={}).status_code == 401
    assert _bad(served, good, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _bad(served, good, headers={"Authorization": KEY}).status_code == 401  # not as a bearer token
    garbage = _bad(served, b"\x00" * 100)
    assert garbage.status_code == 400 and "not a readable safetensors file" in garbage.json()["error"]["message"]
    buffer = io.BytesIO()
    torch.save({"direction.1": torch.zeros(4)}, buffer)  # a pickle
    assert _bad(served, buffer.getvalue()).status_code == 400
    other = ModelShape(architecture="LlamaForCausalLM", num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32,
                       hidden_size=128)
    wrong_model, _ = _pack_bytes(served, random_pack(other, "other", num_heads_selected=2, seed=6))
    refused = _bad(served, wrong_model)
    assert refused.status_code == 400 and "6" in refused.json()["error"]["message"]
    l2s, _ = _pack_bytes(served, random_pack(served.shape, "l2s", num_heads_selected=0, l2s=(1, 2, 8), seed=7))
    refused = _bad(served, l2s)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "l2s"
    condition, _ = _pack_bytes(served, condition_pack(served.shape, "cond", torch.ones(served.shape.hidden_size), 1, 0.5))
    refused = _bad(served, condition)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "condition"
    assert _bad(served, b"\x00" * (2 << 20)).status_code == 413  # over --steering-max-pack-mib 1
    base = served.packs["base"].read_bytes()
    assert _bad(served, base).status_code == 409  # a loaded name
    missing = httpx.delete(served.url + ROUTE + "/nope", headers=AUTH, timeout=60)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert httpx.delete(served.url + ROUTE + "/base", timeout=60).status_code == 401
    listed = httpx.get(served.url + ROUTE, timeout=30).json()["data"]
    assert "fine" not in [p["name"] for p in listed] and "base" in [p["name"] for p in listed]
    assert len(_tokens(_complete(served, {"pack": "base", "alpha": 2.0}))) == 10


def test_a_pack_deleted_while_a_request_uses_it_outlives_that_request(served):
    first = random_pack(served.shape, "temp", num_heads_selected=3, seed=31, sigma_scale=4.0)
    data, raw = _pack_bytes(served, first)
    assert _bad(served, data).status_code == 200
    spec = {"pack": "temp", "alpha": 3.0}
    max_tokens = 400
    streamed: list[int] = []
    started = threading.Event()

    def stream():
        body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True, "steering": spec}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120)
    deleted = httpx.delete(served.url + ROUTE + "/temp", headers=AUTH, timeout=60)
    assert deleted.status_code == 200 and deleted.json()["requests_still_using"] == 1, deleted.text
    refused = _complete(served, spec)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "steering.pack"
    again = _bad(served, data)  # the engine still holds it for the running request
    assert again.status_code == 409 and "still in use" in again.json()["error"]["message"]
    reader.join(300)
    assert streamed == composed_generate(served.hf, PROMPT, max_tokens, [{"heads": pack_heads(raw), "alpha": 3.0}])
    # once that request is done the name is free: a new pack under it steers as the new one
    second = random_pack(served.shape, "temp", num_heads_selected=3, seed=32, sigma_scale=4.0)
    data, raw = _pack_bytes(served, second)
    assert _bad(served, data).status_code == 200
    assert _tokens(_complete(served, spec)) == composed_generate(served.hf, PROMPT, 10,
                                                                 [{"heads": pack_heads(raw), "alpha": 3.0}])
