"""``vllm-steer pack inspect FILE [--json]`` and ``vllm-steer --version``, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import vllm_steer
from vllm_steer.pack import ModelShape, build_pack, load_pack, save_pack
from vllm_steer.pack.synthetic import random_pack

STEER = str(Path(sys.executable).parent / "vllm-steer")
SHAPE = ModelShape(architecture="Qwen3ForCausalLM", num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16,
                   hidden_size=64)


def _steer(*argv):
    return subprocess.run([STEER, *argv], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pack_file(tmp_path_factory):
    """A pack with heads, probes, residual vectors, L2S and a fit record."""
    pack = random_pack(SHAPE, "truthful", num_heads_selected=3, residual_layers=[2, 4], with_probes=True,
                       l2s=(1, 3, 5), seed=7)
    metadata_ = {"dataset": "/data/mc_task.json", "num_examples": 120, "position": "last",
                 "direction": "mass_mean", "selected_val_accuracy": [0.9, 0.8, 0.75],
                 "l2s": {"val_cosine": 0.61, "val_cosine_mean_s": 0.2, "target": "last"},
                 "probe_C": [0.1, 1.0], "probe_C_selection": "validation"}
    pack = build_pack(pack.manifest.model_copy(update={"metadata": metadata_}), pack.tensors())
    return save_pack(tmp_path_factory.mktemp("inspect") / "truthful.safetensors", pack)


def test_json_summary_describes_the_pack(pack_file):
    proc = _steer("pack", "inspect", str(pack_file), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    pack = load_pack(pack_file)
    assert got["name"] == "truthful" and got["file"] == str(pack_file) and got["format_version"] == 1
    assert got["model"] == SHAPE.model_dump()
    assert got["methods"] == ["iti", "residual", "l2s", "mean_s", "fasb"]  # FASB: ITI heads with probes
    assert [(h["layer"], h["head"]) for h in got["heads"]] == pack.selected_heads
    assert [h["sigma"] for h in got["heads"]] == pytest.approx(pack.head_sigmas.tolist(), abs=1e-6)
    assert [h["val_accuracy"] for h in got["heads"]] == [0.9, 0.8, 0.75]
    assert [r["layer"] for r in got["residual_layers"]] == [2, 4]
    assert [r["norm"] for r in got["residual_layers"]] == pytest.approx(
        pack.residual_vectors.norm(dim=-1).tolist(), abs=1e-5)
    assert got["probes"] == {"count": 3}
    assert got["l2s"]["read_layer"] == 1 and got["l2s"]["steer_layer"] == 3 and got["l2s"]["width"] == 5
    assert got["l2s"]["val_cosine"] == 0.61
    assert got["digest"] == pack.digest()


def test_text_summary_names_what_a_person_looks_for(pack_file):
    proc = _steer("pack", "inspect", str(pack_file))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    pack = load_pack(pack_file)
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in text.splitlines()}
    assert lines["steer pack"] == "truthful"
    assert lines["model"].startswith("Qwen3ForCausalLM (family qwen3): 6 layers x 4 heads")
    assert lines["methods"] == "iti, residual, l2s, mean_s, fasb"
    heads = lines["heads (K=3)"]
    for layer, head in pack.selected_heads:
        assert f"layer {layer}:" in heads and str(head) in heads.split(f"layer {layer}:")[1].split(";")[0]
    assert lines["residual"].startswith("layers 2 (norm") and " 4 (norm" in lines["residual"]
    assert "3 linear probes" in lines["probes"] and lines["probes"].endswith("; C 0.1, 1 (validation)")
    assert lines["L2S"].startswith("reads layer 1, steers layer 3, width 5, fitted on raw prompts; validation "
                                   "cosine 0.610")
    assert "dataset mc_task.json" in lines["fit"] and "examples 120" in lines["fit"]
    assert lines["digest"] == f"sha256 {pack.digest()}"


def test_a_pack_without_optional_parts(tmp_path):
    path = save_pack(tmp_path / "plain.safetensors", random_pack(SHAPE, "plain", num_heads_selected=2))
    got = json.loads(_steer("pack", "inspect", str(path), "--json").stdout)
    assert got["methods"] == ["iti"] and got["probes"] is None and got["l2s"] is None
    assert got["residual_layers"] == []
    text = _steer("pack", "inspect", str(path)).stdout
    assert "probes:" in text and "L2S:" in text and "none" in text


def test_a_file_that_is_no_pack_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    for target, words in ((bad, "not a readable safetensors file"), (tmp_path / "none.safetensors", "not found"),
                          (tmp_path / "x.pt", "not found")):
        proc = _steer("pack", "inspect", str(target))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("vllm-steer pack inspect: error:")
        assert words in proc.stderr and str(target) in proc.stderr


def test_version_names_both_packages():
    proc = _steer("--version")
    assert proc.returncode == 0, proc.stderr
    from vllm.version import __version__ as vllm_version

    assert proc.stdout.startswith(f"vllm-steer {vllm_steer.__version__} (")
    assert vllm_version in proc.stdout and metadata.version("vllm-steer") == vllm_steer.__version__
