"""TruthfulQA MC scoring through the engine vs an independent HF reference (hooks from ITI's formula)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, make_llm, truthfulqa_dir
from reference.hf_steering import steering_hooks
from vllm_steer.eval.mc_metrics import mc1, mc2, mc3
from vllm_steer.eval.truthfulqa_mc import evaluate_mc, load_mc_questions
from vllm_steer.fit.datasets import DatasetError
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

ALPHA = 6.0


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama")
    pack_path = save_pack(tmp_path_factory.mktemp("mc") / "mc.safetensors",
                          random_pack(shape_of_checkpoint(path), "mc", num_heads_selected=6, seed=3, sigma_scale=4.0))
    llm = make_llm(path, packs=[pack_path], enforce_eager=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    yield llm, hf, tok, load_file(str(pack_path))
    close_llm(llm)


def _reference_score(hf, tok, question: str, answer: str, heads=None) -> float:
    """Summed log-prob of the answer tokens after ``Q: {question} A:``; ITI on the answer's positions
    (from the last prompt token on)."""
    prompt_ids = tok(f"Q: {question} A:")["input_ids"]
    ids = tok(f"Q: {question} A: {answer}")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad(), steering_hooks(hf, heads=heads, alpha=ALPHA, prompt_len=len(prompt_ids),
                                         prompt_positions="last", state={"offset": 0}):
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))


def test_mc_scores_match_the_hf_reference_unsteered_and_under_iti(setup):
    llm, hf, tok, raw = setup
    questions = load_mc_questions(truthfulqa_dir() / "mc_task.json")[:4]
    heads = [(int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
             for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))]
    moved = 0.0
    for setting, ref_heads in ((None, None), ({"pack": "mc", "method": "iti", "alpha": ALPHA}, heads)):
        results = evaluate_mc(llm, tok, questions, setting)
        for q, r in zip(questions, results):
            ref = {a: _reference_score(hf, tok, q.question, a, ref_heads) for a, _ in q.mc1 + q.mc2}
            assert r.scores == pytest.approx(ref, abs=2e-3)
            true = [ref[a] for a, label in q.mc2 if label]
            false = [ref[a] for a, label in q.mc2 if not label]
            correct = [ref[a] for a, label in q.mc1 if label][0]
            assert (r.mc1, r.mc2, r.mc3) == pytest.approx(
                (mc1(correct, [ref[a] for a, label in q.mc1 if not label]), mc2(true, false), mc3(true, false)),
                abs=1e-3)
            if setting is not None:
                plain = {a: _reference_score(hf, tok, q.question, a) for a in ref}
                moved = max(moved, max(abs(plain[a] - ref[a]) for a in ref))
    assert moved > 0.1  # the steered setting really changes the scores


def test_mc_loader_names_the_bad_field(tmp_path):
    bad = tmp_path / "mc.json"
    bad.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}]))
    with pytest.raises(DatasetError) as err:
        load_mc_questions(bad)
    assert err.value.field == "mc1_targets" and "entry 0" in str(err.value)
    bad.write_text(json.dumps([{"question": "", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}]))
    with pytest.raises(DatasetError) as err:
        load_mc_questions(bad)
    assert err.value.field == "question"
