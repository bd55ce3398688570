"""Every engine-starting CLI works on a fresh machine: no environment variables beyond PATH and HOME
(in particular no VLLM_CPU_KVCACHE_SPACE, which the other tests set), on a model whose context is
64 positions, with every length and dtype left at its default.

Each command starts its own engine, sized for its job (``integration.job_engine``): the KV cache is
given to vLLM explicitly instead of vLLM's reserve of 92 % of the machine, which fails at start-up on
a machine whose free memory is below that share. vLLM logs the explicit size ("Explicitly set ...
GiB for KV cache"), which is what this test reads to see the sizing reached the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import load_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint

STEER = str(Path(sys.executable).parent / "vllm-steer")
EXPLICIT_KV = "Explicitly set"  # vLLM's CPU worker, 0.26 and 0.32, when the KV cache size is given


def _clean_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([STEER, *argv], capture_output=True, text=True, timeout=600, env=_clean_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert EXPLICIT_KV in proc.stdout + proc.stderr  # the job's KV size, not vLLM's share of the machine
    return proc


@pytest.fixture(scope="module")
def short_model(model_cache):
    return cached_tiny_checkpoint("llama", cache_root=model_cache, max_position_embeddings=64)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q: is {i} even? A:", "positive": " yes" if i % 2 == 0 else " no",
                                          "negative": " no" if i % 2 == 0 else " yes"}) for i in range(10)))
    return path


def test_fit_with_defaults_on_a_short_model(short_model, pairs, tmp_path):
    proc = _run(["fit", "--model", str(short_model), "--data", str(pairs), "--out", str(tmp_path / "p.safetensors"),
                 "-k", "3", "--batch-size", "8"], tmp_path)
    pack = load_pack(tmp_path / "p.safetensors", model=shape_of_checkpoint(short_model))
    assert pack.manifest.num_heads_selected == 3 and '"num_train"' in proc.stdout  # the report (after vLLM's log)


def test_fit_l2s_with_defaults_on_a_short_model(short_model, pairs, tmp_path):
    _run(["fit", "l2s", "--model", str(short_model), "--data", str(pairs), "--out", str(tmp_path / "l2s.safetensors"),
          "--read-layer", "1", "--steer-layer", "2", "--width", "4", "--epochs", "2"], tmp_path)
    pack = load_pack(tmp_path / "l2s.safetensors", model=shape_of_checkpoint(short_model))
    assert pack.manifest.methods == ["l2s", "mean_s"] and pack.manifest.l2s.width == 4


def test_eval_with_defaults_on_a_short_model(short_model, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"prompt": f"Q: is {i} even? A:", "true_answer": "yes" if i % 2 == 0 else "no",
                                           "false_answer": "no" if i % 2 == 0 else "yes"}) for i in range(4)))
    proc = _run(["eval", "--model", str(short_model), "--benchmark", "short_answer", "--data", str(items),
                 "--out", str(tmp_path / "job"), "--shards", "1", "--limit", "2", "--max-tokens", "2"], tmp_path)
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert [row["n"] for row in summary] == [2] and "| none | 2 |" in proc.stdout
    assert json.loads((tmp_path / "job" / "job.json").read_text())["engine"]["max_model_len"] == 64
