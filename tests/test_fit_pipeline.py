"""The fit pipeline end to end on a tiny model: TruthfulQA and JSONL in, a loadable pack out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids, truthfulqa_dir
from vllm_steer.errors import SteeringError
from vllm_steer.fit.capture import capture_engine
from vllm_steer.fit.pipeline import FitOptions, fit_steer_pack
from vllm_steer.pack import load_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

TRUTHFULQA = truthfulqa_dir()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def probed_pack(model, tmp_path_factory):
    """A random pack with probes, loaded by the capture engine too (for FASB's MC scoring)."""
    pack = random_pack(shape_of_checkpoint(model), "probed", num_heads_selected=6, with_probes=True, seed=5,
                       sigma_scale=3.0)
    return save_pack(tmp_path_factory.mktemp("probed") / "probed.safetensors", pack)


@pytest.fixture(scope="module")
def engine(model, probed_pack):
    llm = capture_engine(str(model), max_model_len=512, max_num_seqs=32,
                         additional_config={"steering": {"packs": [str(probed_pack)]}})
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def small_truthfulqa(tmp_path_factory):
    """The first 24 questions of the shared mc_task.json (read from shared/, never copied into git)."""
    data = json.loads((TRUTHFULQA / "mc_task.json").read_text())[:24]
    path = tmp_path_factory.mktemp("tqa") / "mc_task.json"
    path.write_text(json.dumps(data))
    return path


def test_fit_truthfulqa_writes_a_pack_the_engine_uses(model, engine, small_truthfulqa, tmp_path):
    out = tmp_path / "tqa.safetensors"
    report = fit_steer_pack(str(model), small_truthfulqa, out,
                            FitOptions(name="tqa", num_heads=5, residual_layers=[1, 2], progress=False,
                                       max_model_len=512), llm=engine)
    pack = load_pack(out, model=shape_of_checkpoint(model))
    assert pack.manifest.num_heads_selected == 5 and pack.probe_weights is not None
    assert pack.selected_heads == report.selected_heads
    meta = pack.manifest.metadata
    assert meta["K"] == 5 and meta["split"]["seed"] == 42 and len(meta["selected_val_accuracy"]) == 5
    assert meta["selected_val_accuracy"] == sorted(meta["selected_val_accuracy"], reverse=True)
    assert meta["probe_C_selection"] == "validation" and len(meta["probe_C_grid"]) > 1
    assert len(meta["probe_C"]) == 1 and meta["probe_C"][0] in meta["probe_C_grid"]
    assert report.heatmap_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pack.manifest.residual_layers == [1, 2]
    # The pack loads into a steering engine and changes the output (eager: compiled steering is
    # covered by test_steering_parity and test_engine_behaviour).
    llm = make_llm(model, packs=[out], enforce_eager=True)
    try:
        prompt = [{"prompt_token_ids": [5, 17, 33, 90, 200]}]
        plain = token_ids(llm.generate(prompt, greedy(8), use_tqdm=False))
        steered = token_ids(llm.generate(prompt, greedy(8, {"pack": "tqa", "alpha": 20.0}), use_tqdm=False))
        assert plain != steered
        _fitted_probes_drive_fasb_like_the_reference(model, out, llm)
    finally:
        close_llm(llm)


def _fitted_probes_drive_fasb_like_the_reference(model, pack_path, llm):
    """FASB with the fitted probes (real, data-dependent scores) equals the HF reference."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reference.hf_fasb import fasb_generate

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    raw = load_file(str(pack_path))
    prompts = random_prompts(8, hf.config.vocab_size, seed=12, min_len=4, max_len=16)
    # A threshold at the median of each prompt's lowest unsteered score splits them.
    unsteered = [fasb_generate(hf, p, raw, alpha=20.0, threshold=0.0, backtrack=2, min_tokens=1, max_tokens=10)
                 for p in prompts]
    threshold = float(np.median([min(t.scores) for t in unsteered]))
    spec = {"pack": "tqa", "method": "fasb", "alpha": 20.0, "threshold": threshold, "backtrack": 2,
            "min_tokens": 1}
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10, spec), use_tqdm=False))
    refs = [fasb_generate(hf, p, raw, alpha=20.0, threshold=threshold, backtrack=2, min_tokens=1, max_tokens=10)
            for p in prompts]
    assert 0 < sum(bool(r.triggers) for r in refs) < len(prompts)
    assert got == [r.tokens for r in refs]


def test_fasb_mc_scoring_matches_the_reference(model, engine, probed_pack):
    """Two-pass MC answer log-probs under FASB (capture pass, then a steered pass from the trigger),
    for long answers and short ones: answers of fewer than skip_first + s tokens are checked at their
    last position only (or not at all when they end before start), as FASB's released MC loop does."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reference.hf_fasb import fasb_mc_logprob, probe_scores_at
    from vllm_steer.eval.fasb_mc import McAnswer, fasb_answer_logprobs

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    raw = load_file(str(probed_pack))
    pack = load_pack(probed_pack)
    rng = np.random.default_rng(3)
    skip, s = 4, 2
    lengths = [12, 12, 10, 9, 7, 7, 6, 6, 6, 5, 5, 5, 4, 3, 1]  # skip + s = 6: short ones are < 6
    answers = [McAnswer(tuple(int(t) for t in rng.integers(3, 500, 6)), tuple(int(t) for t in rng.integers(3, 500, n)),
                        score_from=2 if i % 3 == 1 and n > 2 else 0)
               for i, n in enumerate(lengths)]
    scores = [probe_scores_at(hf, list(a.prompt_ids + a.answer_ids), raw) for a in answers]
    # a threshold that splits the answers: the median of each one's lowest score from start on
    threshold = float(np.median([min(sc[6 + skip:]) for sc in scores if len(sc) > 6 + skip]))
    got = fasb_answer_logprobs(engine, pack, answers, alpha=8.0, threshold=threshold, backtrack=s, skip_first=skip)
    fired = fired_short = 0
    for a, g in zip(answers, got):
        ref_logprob, ref_at = fasb_mc_logprob(hf, list(a.prompt_ids), list(a.answer_ids), raw, alpha=8.0,
                                              threshold=threshold, backtrack=s, skip_first=skip,
                                              score_from=a.score_from)
        assert g.fired_at == ref_at, len(a.answer_ids)
        assert g.logprob == pytest.approx(ref_logprob, abs=2e-3)
        fired += g.fired_at is not None
        fired_short += g.fired_at is not None and len(a.answer_ids) < skip + s
    assert 0 < fired < len(answers)
    assert fired_short >= 2  # short answers are checked (at their last position) and can fire


def test_fit_jsonl_pairs(model, engine, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q: is {i} even? A:", "positive": " yes" if i % 2 == 0 else " no",
             "negative": " no" if i % 2 == 0 else " yes"} for i in range(30)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "pairs.safetensors"
    report = fit_steer_pack(str(model), data, out, FitOptions(name="pairs", num_heads=3, position="mean",
                                                              direction="probe", residual_layers="none",
                                                              probe_c=1.0, progress=False, max_model_len=512),
                            llm=engine)
    pack = load_pack(out)
    assert pack.manifest.methods == ["iti"] and pack.manifest.metadata["position"] == "mean"
    meta = pack.manifest.metadata  # the reference code's fixed C = 1
    assert meta["probe_C"] == [1.0] and meta["probe_C_selection"] == "fixed" and meta["probe_C_grid"] == [1.0]
    assert report.num_train + report.num_val == 60


@pytest.mark.parametrize("content, message", [
    ("", "empty|no rows"),
    ('{"prompt": "a", "positive": "b"}\n', "negative"),
    ('{"prompt": "a", "completion": "b", "label": 1}\n{"prompt": "c", "completion": "d", "label": 1}\n',
     "one class|both"),
])
def test_bad_data_is_refused_and_nothing_is_written(model, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "never.safetensors"
    with pytest.raises(SteeringError, match=message):
        fit_steer_pack(str(model), data, out, FitOptions(name="bad", progress=False), llm=object())
    assert not out.exists() and not list(tmp_path.glob("never*"))


def test_prompts_longer_than_the_context_are_refused(model, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 400, "positive": " a", "negative": " b"}) + "\n"
                    + json.dumps({"prompt": "short", "positive": " a", "negative": " b"}) + "\n")
    with pytest.raises(SteeringError, match="max_model_len|longer"):
        fit_steer_pack(str(model), data, tmp_path / "x.safetensors",
                       FitOptions(name="long", progress=False, max_model_len=64), llm=object())


def test_cli_reports_bad_data_with_exit_code_2(model, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_steer.cli", "fit", "--model", str(model), "--data", str(data),
         "--out", str(tmp_path / "p.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_fit_l2s_writes_a_pack_with_predictor_and_mean_s(model, engine, tmp_path):
    from vllm_steer.fit.l2s import L2STrainOptions
    from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q: is {i} even? A:", "positive": " yes" if i % 2 == 0 else " no",
             "negative": " no" if i % 2 == 0 else " yes"} for i in range(24)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "l2s.safetensors"
    record = fit_l2s_pack(str(model), data, out, L2SFitOptions(
        name="l2s", read_layer=1, steer_layer=2, target="average", progress=False, max_model_len=512,
        train=L2STrainOptions(width=8, epochs=5, seed=3)), llm=engine)
    pack = load_pack(out, model=shape_of_checkpoint(model))
    assert pack.manifest.methods == ["l2s", "mean_s"] and pack.manifest.l2s.read_layer == 1
    assert pack.l2s_w_in.shape == (8, pack.manifest.model.hidden_size)
    assert record["num_prompts"] == 24 and record["num_train"] + record["num_val"] == 24
    assert pack.manifest.metadata["l2s"]["target"] == "average"
    with pytest.raises(SteeringError, match="read_layer"):
        fit_l2s_pack(str(model), data, tmp_path / "x.safetensors",
                     L2SFitOptions(name="x", read_layer=99, steer_layer=1), llm=engine)
    assert not (tmp_path / "x.safetensors").exists()


def test_fit_l2s_contrastive_prompts_reads_the_targets_hf_reads(model, engine, tmp_path):
    """The P2S form: every row has the same rewritings, so every target (and Mean-S, their mean) is
    mean h(X+) - mean h(X-) at the last token after layer L*, which plain HF computes on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.fit.l2s import L2STrainOptions
    from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack

    positives, negative = ["You are careful. Q: what is 2+2? A:", "Be exact. Q: what is 2+2? A:"], "Q: 2+2? A:"
    rows = [{"prompt": f"Q: what is {i}+{i}? A:", "positive_prompt": positives, "negative_prompt": negative}
            for i in range(12)]
    data = tmp_path / "p2s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p2s.safetensors"
    record = fit_l2s_pack(str(model), data, out, L2SFitOptions(
        name="p2s", read_layer=0, steer_layer=2, progress=False, max_model_len=512,
        train=L2STrainOptions(width=4, epochs=2, seed=0)), llm=engine)
    assert record["num_prompts"] == 12
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model))

    def stream(text):
        with torch.no_grad():
            ids = torch.tensor([tok(text).input_ids])
            return hf(input_ids=ids, output_hidden_states=True).hidden_states[2 + 1][0, -1]

    expected = torch.stack([stream(t) for t in positives]).mean(0) - stream(negative)
    mean_s = load_pack(out).l2s_mean
    assert torch.allclose(mean_s, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    with pytest.raises(SteeringError, match="target") as info:  # no completion to average over
        fit_l2s_pack(str(model), data, tmp_path / "avg.safetensors", L2SFitOptions(
            name="avg", read_layer=0, steer_layer=2, target="average", progress=False, max_model_len=512),
            llm=engine)
    assert info.value.field == "target" and not (tmp_path / "avg.safetensors").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: x? A:", "positive_prompt": [], "negative_prompt": "y"}) + "\n")
    with pytest.raises(SteeringError, match="positive_prompt"):
        fit_l2s_pack(str(model), bad, tmp_path / "bad.safetensors", L2SFitOptions(
            name="bad", read_layer=0, steer_layer=2, progress=False, max_model_len=512), llm=engine)


def test_fold_packs_are_fitted_without_their_folds_questions(model, engine, small_truthfulqa, tmp_path):
    from vllm_steer.eval.folds import fit_fold_packs, fold_of

    options = FitOptions(name="tqa", num_heads=3, residual_layers="none", progress=False, max_model_len=512)
    paths = fit_fold_packs(str(model), small_truthfulqa, 2, 0, tmp_path, options, llm=engine)
    questions = [e["question"] for e in json.loads(small_truthfulqa.read_text())]
    for k, path in enumerate(paths):
        assert load_pack(path).name == f"tqa.fold{k}"
        train = [e["question"] for e in json.loads((tmp_path / f"tqa.fold{k}.train.json").read_text())]
        assert train == [q for q in questions if fold_of(q, 2) != k] and 0 < len(train) < len(questions)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert fit_fold_packs(str(model), small_truthfulqa, 2, 0, tmp_path, options, llm=engine) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # kept, not refitted


@pytest.mark.parametrize("protocol", [{}, {"mc_format": "qa", "instruction": "Be true.", "primer": "Q: a?\nA: b.",
                                       "mc_start_offset": 1}])
def test_eval_job_scores_fasb_mc_on_the_capture_engine(model, engine, probed_pack, small_truthfulqa, tmp_path,
                                                       protocol):
    from transformers import AutoTokenizer

    from vllm_steer.eval.job import EvalJob, Setting, ShardRunner, run_job
    from vllm_steer.eval.mc_protocol import McProtocol
    from vllm_steer.eval.truthfulqa_mc import evaluate_mc, load_mc_questions

    spec = {"pack": "probed", "method": "fasb", "alpha": 8.0, "threshold": 0.6, "backtrack": 2}
    job = EvalJob(model=str(model), data=str(small_truthfulqa), packs=(str(probed_pack),),
                  settings=(Setting(spec),), num_shards=2, limit=4, **protocol)
    assert job.needs_capture
    report = run_job(job, tmp_path, progress=False, runner=ShardRunner(job.to_json(), llm=engine))
    assert report.complete
    items = json.loads((tmp_path / "results.json").read_text())[0]["items"]
    mc = McProtocol(answer_format=protocol.get("mc_format", "iti"), instruction=protocol.get("instruction"),
                    primer=protocol.get("primer"), start_offset=protocol.get("mc_start_offset", 4))
    direct = evaluate_mc(engine, AutoTokenizer.from_pretrained(str(model)), load_mc_questions(small_truthfulqa)[:4],
                         spec, pack=load_pack(probed_pack), protocol=mc)
    assert [r["scores"] for r in items] == [pytest.approx(d.scores, abs=1e-4) for d in direct]
