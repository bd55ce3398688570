"""A user's mistake in any command line ends with one message naming the flag or file, exit code 2,
and no traceback: ``vllm-steer fit | fit l2s | fit cast | eval | pack inspect | pack import | pack export`` and
``vllm serve --steering-*``.

Every case runs the installed command in a subprocess; all are caught before an engine starts, so
the cases run side by side (four subprocesses at a time; about a minute on 2 idle cores, most of it
the `vllm serve` cases, which import all of vLLM).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import truthfulqa_dir
from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import ModelShape, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

BIN = Path(sys.executable).parent
STEER = str(BIN / "vllm-steer")
VLLM = str(BIN / "vllm")
UNREACHABLE_RAY = "10.255.255.1:6379"  # a non-routable address: nothing answers there
FIXTURES = Path(__file__).parent / "fixtures" / "interop"


def _cases(w: dict) -> dict[str, tuple[list[str], str, str]]:
    """case id -> (command line, the message's program prefix, words the message must name)."""
    model, data, sa, out = w["model"], w["pairs"], w["short_answer"], w["out"]
    fit = [STEER, "fit", "--model", model, "--data", data, "--out", out]
    l2s = [STEER, "fit", "l2s", "--model", model, "--data", data, "--out", out, "--read-layer", "1",
           "--steer-layer", "2"]
    cast = [STEER, "fit", "cast", "--model", model, "--data", w["conditions"], "--out", out]
    ev = [STEER, "eval", "--model", model, "--benchmark", "short_answer", "--data", sa, "--out", w["job"]]

    def imp(source):
        return [STEER, "pack", "import", source]
    serve = [VLLM, "serve", model]
    return {
        # vllm-steer fit
        "fit-missing-data": ([*fit[:5], w["missing"] + ".jsonl", *fit[6:]], "vllm-steer fit", "--data"),
        "fit-k-0": ([*fit, "-k", "0"], "vllm-steer fit", "-k/--num-heads"),
        "fit-k-over-the-model": ([*fit, "-k", "99"], "vllm-steer fit", "-k/--num-heads"),
        "fit-val-fraction": ([*fit, "--val-fraction", "1.5"], "vllm-steer fit", "--val-fraction"),
        "fit-batch-size-0": ([*fit, "--batch-size", "0"], "vllm-steer fit", "--batch-size"),
        "fit-residual-layer": ([*fit, "--residual-layers", "1,99"], "vllm-steer fit", "--residual-layers"),
        "fit-longer-than-the-model": ([*fit, "--max-model-len", "100"], "vllm-steer fit", "--max-model-len"),
        "fit-no-such-model": ([STEER, "fit", "--model", w["missing"], *fit[4:]], "vllm-steer fit", "--model"),
        "fit-folder-not-a-checkpoint": ([STEER, "fit", "--model", w["empty_dir"], *fit[4:]], "vllm-steer fit",
                                        "--model"),
        "fit-out-suffix": ([*fit[:7], out.replace(".safetensors", ".pt")], "vllm-steer fit", "--out"),
        "fit-tensor-parallel": ([*fit, "--tensor-parallel-size", "3"], "vllm-steer fit", "--tensor-parallel-size"),
        "fit-pack-name": ([*fit, "--name", "a/b"], "vllm-steer fit", "--name"),
        "fit-probe-c-0": ([*fit, "--probe-c", "0"], "vllm-steer fit", "--probe-c"),
        "fit-probe-c-inf": ([*fit, "--probe-c", "inf"], "vllm-steer fit", "--probe-c"),
        # vllm-steer fit l2s
        "l2s-read-layer": ([*l2s[:-4], "--read-layer", "99", "--steer-layer", "2"], "vllm-steer fit l2s",
                           "--read-layer"),
        "l2s-width-0": ([*l2s, "--width", "0"], "vllm-steer fit l2s", "--width"),
        "l2s-missing-data": ([*l2s[:6], w["missing"] + ".jsonl", *l2s[7:]], "vllm-steer fit l2s", "--data"),
        "l2s-longer-than-the-model": ([*l2s, "--max-model-len", "65"], "vllm-steer fit l2s", "--max-model-len"),
        "l2s-no-chat-template": ([STEER, "fit", "l2s", "--model", w["no_chat_model"], *l2s[5:], "--chat-template"],
                                 "vllm-steer fit l2s", "--chat-template"),
        # vllm-steer fit cast
        "cast-missing-data": ([*cast[:6], w["missing"] + ".jsonl", *cast[7:]], "vllm-steer fit cast", "--data"),
        "cast-row-condition-not-a-bool": ([*cast[:6], w["conditions_bad_value"], *cast[7:]], "vllm-steer fit cast",
                                          "line 2: 'condition' must be true/false"),
        "cast-row-without-prompt": ([*cast[:6], w["conditions_no_prompt"], *cast[7:]], "vllm-steer fit cast",
                                    "line 3: missing key 'prompt'"),
        "cast-one-label": ([*cast[:6], w["conditions_one_label"], *cast[7:]], "vllm-steer fit cast",
                           "found 4 true and 0 false"),
        "cast-data-checked-before-the-model": (
            [STEER, "fit", "cast", "--model", w["missing"], "--data", w["conditions_bad_value"], "--out", out],
            "vllm-steer fit cast", "--data"),
        "cast-layer-0": ([*cast, "--layers", "0,1"], "vllm-steer fit cast", "--layers: layer 0"),
        "cast-layer-outside-the-model": ([*cast, "--layers", "1,4"], "vllm-steer fit cast", "--layers: layer 4"),
        "cast-layers-not-a-list": ([*cast, "--layers", "1-3"], "vllm-steer fit cast", "--layers"),
        "cast-val-fraction": ([*cast, "--val-fraction", "1"], "vllm-steer fit cast", "--val-fraction"),
        "cast-out-suffix": ([*cast[:8], out.replace(".safetensors", ".pt")], "vllm-steer fit cast", "--out"),
        "cast-out-a-folder": ([*cast[:8], w["empty_dir"] + ".safetensors"], "vllm-steer fit cast", "--out"),
        "cast-no-such-model": ([STEER, "fit", "cast", "--model", w["missing"], *cast[5:]], "vllm-steer fit cast",
                               "--model"),
        "cast-longer-than-the-model": ([*cast, "--max-model-len", "65"], "vllm-steer fit cast", "--max-model-len"),
        "cast-no-chat-template": ([STEER, "fit", "cast", "--model", w["no_chat_model"], *cast[5:], "--chat-template"],
                                  "vllm-steer fit cast", "--chat-template"),
        # vllm-steer eval
        "eval-shards-0": ([*ev, "--shards", "0"], "vllm-steer eval", "--shards"),
        "eval-actors-negative": ([*ev, "--actors", "-1"], "vllm-steer eval", "--actors"),
        "eval-limit-0": ([*ev, "--limit", "0"], "vllm-steer eval", "--limit"),
        "eval-fit-probe-c-without-fit-folds": ([*ev, "--fit-probe-c", "1"], "vllm-steer eval", "--fit-probe-c"),
        "eval-unreachable-ray": ([*ev, "--actors", "1", "--ray-address", UNREACHABLE_RAY], "vllm-steer eval",
                                 "--ray-address"),
        "eval-setting-not-json": ([*ev, "--setting", "{alpha"], "vllm-steer eval", "--setting"),
        "eval-setting-bad-field": ([*ev, "--pack", w["pack"], "--setting", '{"pack": "fits", "alpha": "8"}'],
                                   "vllm-steer eval", "steering.alpha"),
        "eval-setting-unknown-pack": ([*ev, "--setting", '{"pack": "nowhere", "alpha": 2}'], "vllm-steer eval",
                                      "--setting"),
        "eval-missing-pack": ([*ev, "--pack", w["missing"] + ".safetensors"], "vllm-steer eval", "--pack"),
        "eval-corrupt-pack": ([*ev, "--pack", w["corrupt"]], "vllm-steer eval", "--pack"),
        "eval-pack-of-another-model": ([*ev, "--pack", w["other_pack"]], "vllm-steer eval", "--pack"),
        "eval-missing-data": ([*ev[:7], w["missing"] + ".jsonl", *ev[8:]], "vllm-steer eval", "--data"),
        "eval-items-longer-than-the-model": (
            [STEER, "eval", "--model", model, "--data", w["mc_task"], "--out", w["job"]], "vllm-steer eval",
            "--max-model-len"),
        "eval-alphas": ([*ev, "--setting", '{"method": "off"}', "--alphas", "1,x"], "vllm-steer eval", "--alphas"),
        "eval-instruction-file": ([*ev, "--instruction-file", w["missing"] + ".txt"], "vllm-steer eval",
                                  "--instruction-file"),
        "eval-answer-prefix-value": ([*ev, "--answer-prefix", "question"], "vllm-steer eval", "--answer-prefix"),
        "eval-answer-prefix-benchmark": ([*ev, "--answer-prefix", "generated"], "vllm-steer eval",
                                         "--answer-prefix"),
        "eval-mc-format-value": ([*ev, "--mc-format", "paper"], "vllm-steer eval", "--mc-format"),
        "eval-mc-start-offset-negative": ([*ev, "--mc-start-offset", "-1"], "vllm-steer eval", "--mc-start-offset"),
        "eval-mc-scored-value": ([*ev, "--mc-scored", "all"], "vllm-steer eval", "--mc-scored"),
        "eval-mc-format-benchmark": ([*ev, "--mc-format", "qa"], "vllm-steer eval", "--mc-format"),
        "eval-primer-file": ([STEER, "eval", "--model", model, "--data", w["mc_task"], "--out", w["job"],
                              "--primer-file", w["missing"] + ".txt"], "vllm-steer eval", "--primer-file"),
        # vllm-steer pack inspect
        "inspect-missing": ([STEER, "pack", "inspect", w["missing"] + ".safetensors"], "vllm-steer pack inspect",
                            "not found"),
        "inspect-corrupt": ([STEER, "pack", "inspect", w["corrupt"]], "vllm-steer pack inspect", "safetensors"),
        "inspect-model-missing": ([STEER, "pack", "inspect", w["pack"], "--model", w["missing"]],
                                  "vllm-steer pack inspect", "--model"),
        "inspect-a-control-vector": ([STEER, "pack", "inspect", str(FIXTURES / "repeng_control_vector.gguf")],
                                     "vllm-steer pack inspect", "vllm-steer pack import"),
        # vllm-steer pack import | export
        "import-a-steer-pack": ([*imp(w["pack"]), "--model", model, "--out", out], "vllm-steer pack import",
                                "already a vllm-steer pack"),
        "import-pickle": ([*imp(w["pickle"]), "--model", model, "--out", out], "vllm-steer pack import",
                          "never loads"),
        "import-missing": ([*imp(w["missing"] + ".gguf"), "--model", model, "--out", out], "vllm-steer pack import",
                           "no such file"),
        "import-out-not-a-pack": ([*imp(w["vectors"]), "--model", model, "--out", w["job"] + ".gguf"],
                                  "vllm-steer pack import", "--out"),
        "import-bad-name": ([*imp(w["vectors"]), "--model", model, "--out", out, "--name", "a b"],
                            "vllm-steer pack import", "--name"),
        "import-one-vector-without-layer": ([*imp(w["one_vector"]), "--model", model, "--out", out],
                                            "vllm-steer pack import", "--layer"),
        "import-layer-outside-the-model": ([*imp(w["one_vector"]), "--model", model, "--out", out, "--layer", "9"],
                                           "vllm-steer pack import", "layer 9"),
        "import-wrong-hidden-size": ([*imp(w["narrow_vectors"]), "--model", model, "--out", out],
                                     "vllm-steer pack import", "hidden size"),
        "import-model-missing": ([*imp(w["vectors"]), "--model", w["missing"], "--out", out],
                                 "vllm-steer pack import", "--model"),
        "export-heads-only-pack": ([STEER, "pack", "export", w["pack"], "--format", "gguf", "--out", w["job"] + ".gguf"],
                                   "vllm-steer pack export", "no residual vectors"),
        "export-missing-pack": ([STEER, "pack", "export", w["missing"] + ".safetensors", "--format", "gguf", "--out",
                                 w["job"] + ".gguf"], "vllm-steer pack export", "not found"),
        # vllm serve --steering-*
        "serve-plugin-without-packs": ([*serve, "--steering-plugin"], "vllm serve", "--steering-packs"),
        "serve-missing-packs-dir": ([*serve, "--steering-plugin", "--steering-packs", w["missing"]], "vllm serve",
                                    "--steering-packs"),
        "serve-pack-of-another-model": ([*serve, "--steering-plugin", "--steering-packs", w["other_dir"]],
                                        "vllm serve", "does not fit"),
        "serve-admin-key-without-plugin": ([*serve, "--steering-admin-key", "k"], "vllm serve", "--steering-plugin"),
        "serve-admin-key-with-two-api-servers": (
            [*serve, "--steering-plugin", "--steering-packs", w["packs_dir"], "--steering-admin-key", "k",
             "--api-server-count", "2"], "vllm serve", "one API server"),
    }


@pytest.fixture(scope="module")
def world(model_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    model = cached_tiny_checkpoint("llama", cache_root=model_cache, max_position_embeddings=64)
    shape = shape_of_checkpoint(model)
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"Q: is {i} even? A:", "positive": " yes", "negative": " no"})
                               for i in range(8)))
    short_answer = root / "items.jsonl"
    short_answer.write_text(json.dumps({"prompt": "Q: is 2 even? A:", "true_answer": "yes"}) + "\n")
    (root / "empty").mkdir()
    (root / "empty.safetensors").mkdir()  # a folder named like a pack
    condition_rows = [{"prompt": f"is it raining on day {i}?", "condition": i % 2 == 0} for i in range(8)]
    conditions = {"conditions": condition_rows,
                  "conditions_bad_value": [condition_rows[0], {"prompt": "rain?", "condition": "yes"}],
                  "conditions_no_prompt": [*condition_rows[:2], {"condition": True}],
                  "conditions_one_label": [r for r in condition_rows if r["condition"]]}
    for key, rows in conditions.items():
        (root / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    no_chat_model = root / "no_chat_model"  # the tiny model, its tokenizer without a chat template
    shutil.copytree(model, no_chat_model)
    (no_chat_model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((no_chat_model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (no_chat_model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    packs_dir = root / "packs"
    pack = save_pack(packs_dir / "fits.safetensors", random_pack(shape, "fits", num_heads_selected=2))
    corrupt_dir = root / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    other = ModelShape(architecture="LlamaForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                       hidden_size=128)
    other_pack = save_pack(root / "other" / "other.safetensors", random_pack(other, "other", num_heads_selected=2))
    (root / "vectors.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle (of 1): refused by name, never loaded
    save_file({"layers.1": torch.ones(shape.hidden_size)}, str(root / "vectors.safetensors"))
    save_file({"layers.1": torch.ones(shape.hidden_size // 2)}, str(root / "narrow.safetensors"))
    save_file({"steer": torch.ones(shape.hidden_size)}, str(root / "one_vector.safetensors"))
    return {
        "pickle": str(root / "vectors.pt"), "vectors": str(root / "vectors.safetensors"),
        "narrow_vectors": str(root / "narrow.safetensors"), "one_vector": str(root / "one_vector.safetensors"),
        "model": str(model), "pairs": str(pairs), "short_answer": str(short_answer), "out": str(root / "p.safetensors"),
        "job": str(root / "job"), "missing": str(root / "missing"), "empty_dir": str(root / "empty"),
        "pack": str(pack), "packs_dir": str(packs_dir), "corrupt": str(corrupt_dir / "broken.safetensors"),
        "corrupt_dir": str(corrupt_dir), "other_pack": str(other_pack), "other_dir": str(root / "other"),
        "mc_task": str(truthfulqa_dir() / "mc_task.json"), "no_chat_model": str(no_chat_model),
        **{key: str(root / f"{key}.jsonl") for key in conditions},
    }


@pytest.fixture(scope="module")
def runs(world, request):
    """The selected cases' (return code, stderr, seconds), run four at a time (``-k serve`` runs the
    ``vllm serve`` cases only)."""

    def run(argv):
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        return proc.returncode, proc.stderr, time.monotonic() - start

    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = {name: case for name, case in _cases(world).items() if name in selected}
    slow_first = sorted(cases, key=lambda name: (cases[name][0][0] != VLLM, "ray" not in name))  # vLLM imports
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, cases[name][0]) for name in slow_first}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(_cases(defaultdict(str))))
def test_a_mistake_ends_with_one_message_and_exit_code_2(case, world, runs):
    _, prog, words = _cases(world)[case]
    code, stderr, seconds = runs[case]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith(f"{prog}: error:") and words in message, stderr[-3000:]
    assert sum(line.startswith(f"{prog}: error") for line in lines) == 1
    if case == "eval-unreachable-ray":
        assert seconds < 60  # not Ray's minutes of retries
    assert not Path(world["out"]).exists() and not Path(world["job"]).exists()  # nothing written
