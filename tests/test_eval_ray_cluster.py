"""``vllm-steer eval --ray-address`` against a real Ray cluster that this test starts with ``ray start
--head`` (not Ray's in-process local mode): the actors run in that cluster; a driver without the
cluster's token is refused naming ``--ray-address`` and the token, with exit code 2.

The cluster is kept on loopback: Ray rewrites 127.0.0.1 to the machine's own address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-node switch), and a head started so must be joined
with the same switch. It uses token authentication, Ray's default for new clusters since 2.5x, so
the driver needs ``RAY_AUTH_MODE=token`` and the token as every real deployment's drivers do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

BIN = Path(sys.executable).parent
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1 with token authentication: (address, env a driver needs)."""
    port = _free_port()
    token = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {**os.environ, **LOOPBACK_ONLY, **auth}
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's unix sockets live under it
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--object-store-memory", str(200 * 2**20), "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", temp],
        capture_output=True, text=True, timeout=180, env=env)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}", {**LOOPBACK_ONLY, **auth}
    finally:
        _stop_cluster(temp)


def _stop_cluster(temp: str) -> None:
    """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine): each of
    them names the cluster's temporary folder on its command line; its workers exit with its raylet."""
    def pids():
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if temp.encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_args(model_cache, tmp_path_factory):
    model = cached_tiny_checkpoint("llama", cache_root=model_cache, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("raycluster")
    pack = save_pack(folder / "tq.safetensors",
                     random_pack(shape_of_checkpoint(model), "tq", num_heads_selected=6, seed=3, sigma_scale=4.0))
    items = folder / "items.jsonl"
    items.write_text("\n".join(json.dumps({"prompt": f"Q: is {i} even? A:", "true_answer": "yes" if i % 2 == 0 else "no",
                                           "false_answer": "no" if i % 2 == 0 else "yes"}) for i in range(4)))
    return ["eval", "--model", str(model), "--benchmark", "short_answer", "--data", str(items), "--pack", str(pack),
            "--setting", '{"method": "off"}', "--setting", '{"pack": "tq", "method": "iti", "alpha": 8}',
            "--shards", "2", "--max-tokens", "4"]


def _eval(argv: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vllm-steer"), *argv], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env_extra})


def _items(out: Path) -> list[list[dict]]:
    return [setting["items"] for setting in json.loads((out / "results.json").read_text())]


def test_eval_actors_run_on_a_started_cluster(ray_cluster, job_args, tmp_path):
    """(That actors give the in-process job's results is ``test_eval``'s, with Ray's local mode.)"""
    address, env = ray_cluster
    on_cluster = _eval([*job_args, "--out", str(tmp_path / "cluster"), "--actors", "1", "--ray-address", address], env)
    assert on_cluster.returncode == 0, on_cluster.stderr[-4000:]
    # The job joined the cluster this test started (its GCS, its one loopback node), not a local Ray.
    assert f"eval: 1 actor(s) on the Ray cluster at {address}: 1 node(s) (127.0.0.1)" in on_cluster.stderr
    items = _items(tmp_path / "cluster")
    assert [len(setting) for setting in items] == [4, 4] and "| off | 4 |" in on_cluster.stdout
    assert [r["text"] for r in items[0]] != [r["text"] for r in items[1]]  # steering acted


def test_a_driver_without_the_clusters_token_is_refused_naming_it(ray_cluster, job_args, tmp_path):
    address, _ = ray_cluster
    proc = _eval([*job_args, "--out", str(tmp_path / "job"), "--actors", "1", "--ray-address", address],
                 {**LOOPBACK_ONLY, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-steer eval: ") and "--ray-address" in last and "RAY_AUTH_TOKEN" in last, last
