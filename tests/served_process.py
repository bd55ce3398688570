"""A real ``vllm serve`` (or ``python -m vllm.entrypoints.openai.api_server``) process on loopback for
the server tests: start it, wait for /health, read its /metrics, stop it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SERVED_NAME = "demo"  # the README examples' model name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(entry: str, model: Path, packs: Path, port: int, engine_args: dict,
                   extra: tuple[str, ...] = ()) -> list[str]:
    flags = ["--steering-plugin", "--steering-packs", str(packs), "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", SERVED_NAME, *extra]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    if entry == "vllm serve":
        return [str(Path(sys.executable).parent / "vllm"), "serve", str(model), *flags]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *flags]


async def post_completion(http: httpx.AsyncClient, body: dict, *, hang_up: bool = False) -> int:
    """POST ``body`` to ``/v1/completions``; the status code. ``hang_up``: as a streaming client that
    hangs up after the first event (200 tokens asked, so the request is still running then)."""
    if hang_up:
        async with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 200, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
            return r.status_code
    return (await http.post("/v1/completions", json=body)).status_code


def metric(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric over its labels."""
    return sum(v for k, v in metrics.items() if re.fullmatch(re.escape(name) + r"(\{.*\})?", k))


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

    def wait_until_idle(self, timeout: float = 60) -> dict[str, float]:
        """Metrics once nothing runs or waits, every KV block is free and no steering slot is held
        (or the last ones seen, after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if self.is_idle(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.5)

    @staticmethod
    def is_idle(m: dict[str, float]) -> bool:
        return (metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
                and metric(m, "vllm:kv_cache_usage_perc") == 0.0 and m["vllm_steer:slots_in_use"] == 0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(command: list[str], model: Path, packs: dict[str, Path], port: int, log: Path,
                 env: dict[str, str] | None = None) -> Served:
    """Start ``command`` (its output to ``log``; ``env``: extra environment variables) and wait until
    its /health answers."""
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = Served(model, packs, port, proc, log)
    deadline = time.monotonic() + 600  # CI runs two test legs side by side on 2 cores
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vllm serve did not come up in 600 s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
