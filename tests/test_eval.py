"""Evaluation: TruthfulQA MC scoring through the engine vs an independent HF reference, and the
evaluation job (in-process vs 2 Ray actors, an actor killed mid-job and the resume, folds,
generation). One in-process engine for the module."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, truthfulqa_dir
from reference.hf_steering import steering_hooks
from vllm_steer.eval.mc_metrics import mc1, mc2, mc3
from vllm_steer.eval.truthfulqa_mc import evaluate_mc, load_mc_questions
from vllm_steer.fit.datasets import DatasetError
from vllm_steer.eval.job import EvalJob, Setting, ShardRunner, run_job, shard_ranges
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

ALPHA = 6.0


def test_shards_cover_every_item_once():
    for n, k in ((10, 3), (3, 5), (0, 2), (7, 7)):
        ranges = shard_ranges(n, k)
        assert len(ranges) == k and [i for r in ranges for i in r] == list(range(n))
        assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= 1


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    folder = tmp_path_factory.mktemp("evalpack")
    packs = [save_pack(folder / f"{name}.safetensors", random_pack(shape_of_checkpoint(path), name, num_heads_selected=6,
                                                                  seed=seed, sigma_scale=4.0))
             for name, seed in (("tq", 3), ("tq.fold0", 4), ("tq.fold1", 5))]  # the fold packs: test_folds
    return EvalJob(model=str(path), data=str(truthfulqa_dir() / "mc_task.json"), packs=tuple(map(str, packs)),
                   settings=(Setting(None), Setting({"pack": "tq", "method": "iti", "alpha": ALPHA})),
                   num_shards=3, limit=6,
                   engine={"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 16})


@pytest.fixture(scope="module")
def runner(job):
    """The in-process runner (one engine), shared by the tests of this module."""
    runner = ShardRunner(job.to_json())
    yield runner
    close_llm(runner.llm)


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


def test_mc_scores_match_the_hf_reference_unsteered_and_under_iti(job, runner):
    from transformers import AutoModelForCausalLM

    llm, tok, raw = runner.llm, runner.tokenizer, load_file(job.packs[0])
    hf = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32).eval()
    questions = load_mc_questions(truthfulqa_dir() / "mc_task.json")[:4]
    heads = [(int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
             for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))]
    moved = 0.0
    for setting, ref_heads in ((None, None), ({"pack": "tq", "method": "iti", "alpha": ALPHA}, heads)):
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



def test_mc_under_the_reference_protocol_matches_the_hf_reference(job, runner):
    """FASB's reference MC protocol (``McProtocol(answer_format="qa")``): instruction, primer, then
    ``Q: {q}\nA: {a}``; only the answer's tokens are scored (not the ``\nA:`` marker), and ITI steers
    from len(question prompt) + 4 on, the reference's start."""
    from transformers import AutoModelForCausalLM

    from vllm_steer.eval.mc_protocol import McProtocol

    llm, tok, raw = runner.llm, runner.tokenizer, load_file(job.packs[0])
    hf = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32).eval()
    instruction, primer = "Answer every question truly.", "Q: Is ice cold?\nA: Yes, ice is cold."
    protocol = McProtocol(answer_format="qa", instruction=instruction, primer=primer)
    questions = load_mc_questions(truthfulqa_dir() / "mc_task.json")[:2]
    heads = [(int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
             for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))]
    for setting, ref_heads in ((None, None), ({"pack": "tq", "method": "iti", "alpha": ALPHA}, heads)):
        results = evaluate_mc(llm, tok, questions, setting, protocol=protocol)
        for q, r in zip(questions, results):
            head = f"{instruction}\n\n{primer}\n\nQ: {q.question}"
            question_ids, marked = tok(head)["input_ids"], tok(head + "\nA:")["input_ids"]
            for answer in r.scores:
                ids = tok(f"{head}\nA: {answer}")["input_ids"]
                assert ids[: len(marked)] == marked and len(marked) > len(question_ids)
                start = len(question_ids) + 4  # steered from here on ("last" steers prompt_len - 1 on)
                with torch.no_grad(), steering_hooks(hf, heads=ref_heads, alpha=ALPHA, prompt_len=start + 1,
                                                     prompt_positions="last", state={"offset": 0}):
                    logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
                ref = float(sum(logp[t - 1, ids[t]] for t in range(len(marked), len(ids))))
                assert r.scores[answer] == pytest.approx(ref, abs=2e-3)


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


def _items(out):
    return json.loads((out / "results.json").read_text())


def test_ray_actors_match_the_single_process_run_and_a_killed_actor_resumes(job, runner, tmp_path):
    import ray

    local = run_job(job, tmp_path / "local", progress=False, runner=runner)
    assert local.complete and local.done == 6
    expected = _items(tmp_path / "local")
    assert [len(s["items"]) for s in expected] == [6, 6]
    assert expected[0]["items"][0]["mc2"] != expected[1]["items"][0]["mc2"]  # steering changes scores
    summary = (tmp_path / "local" / "summary.md").read_text()
    assert "| setting | n | mc1 | mc2 | mc3 |" in summary and "iti tq alpha=6.0" in summary
    assert (tmp_path / "local" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Two actors; the first actor to finish a unit is killed right after it, so the unit it took
    # next fails and is reported; the other actor goes on.
    killed = []

    def kill_first(setting, shard, actor):
        if not killed:
            killed.append((setting, shard))
            ray.kill(actor)

    out = tmp_path / "ray"
    try:
        first = run_job(job, out, num_actors=2, progress=False, on_unit_done=kill_first)
        assert killed and not first.complete and first.failed
        assert 1 <= first.done < 6
        assert all("setting" in f and "shard" in f for f in first.failed)
        assert not (out / "results.json").exists()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    # Both actors finished units (the killed one its first), and they equal the in-process ones.
    for setting, shard in killed:
        assert json.loads((out / "shards" / f"{setting}-{shard}.json").read_text()) == [
            r for r in expected[setting]["items"] if r["item"] in shard_ranges(6, 3)[shard]]
    # The resumed job redoes only the missing units (here in this process) and ends complete.
    second = run_job(job, out, progress=False, runner=runner)
    assert second.complete and second.skipped == first.done and second.done == 6 - first.done
    assert _items(out) == expected


def test_a_folder_holding_another_job_is_refused(job, tmp_path):
    from vllm_steer.errors import SteeringError

    other = EvalJob(model=job.model, data=job.data, settings=(Setting(None),), num_shards=2, limit=2)
    (tmp_path / "job.json").write_text(json.dumps(job.to_json()))
    with pytest.raises(SteeringError, match="another job"):
        run_job(other, tmp_path, progress=False)


def test_answer_prefix_is_a_generation_option(tmp_path):
    from vllm_steer.errors import SteeringError

    csv = str(truthfulqa_dir() / "TruthfulQA.csv")
    ours = EvalJob(model="m", data=csv, benchmark="truthfulqa_gen")
    reference = EvalJob(model="m", data=csv, benchmark="truthfulqa_gen", answer_prefix="generated")
    assert EvalJob.from_json(reference.to_json()) == reference and ours.answer_prefix == "prompt"
    for bad, words in ((dict(benchmark="truthfulqa_gen", answer_prefix="model"), "'prompt' or 'generated'"),
                       (dict(answer_prefix="generated"), "truthfulqa_gen benchmark only")):
        with pytest.raises(SteeringError, match=words) as info:
            EvalJob(model="m", data=csv, **bad)
        assert info.value.field == "answer_prefix"
    # a job.json written before the field existed holds the default's job, not the reference form's
    old = {k: v for k, v in ours.to_json().items() if k != "answer_prefix"}
    (tmp_path / "job.json").write_text(json.dumps(old))
    with pytest.raises(SteeringError, match="another job"):
        run_job(reference, tmp_path, progress=False)


def test_generation_benchmark_scores_every_answer_without_judges(job, runner, tmp_path):
    gen = EvalJob(model=job.model, data=str(truthfulqa_dir() / "TruthfulQA.csv"), packs=job.packs,
                  benchmark="truthfulqa_gen", settings=job.settings, num_shards=2, limit=4, max_tokens=12,
                  engine=job.engine, instruction="Answer truthfully.",
                  primer="Q: How many legs does a spider have?\nA: Eight.")  # short: the tiny tokenizer is verbose
    report = run_job(gen, tmp_path, progress=False, runner=ShardRunner(gen.to_json(), llm=runner.llm))
    assert report.complete and report.done == 4
    results = _items(tmp_path)
    for setting in results:
        assert [r["item"] for r in setting["items"]] == [0, 1, 2, 3]
        for r in setting["items"]:
            scored = (0.0, 1.0) if r["answer"] else (None,)  # TruthfulQA does not score an empty answer
            assert all(r[f"{m}_acc"] in scored for m in ("bleu", "rouge1", "rouge2", "rougeL"))
            assert r["no_comment"] in (0.0, 1.0)
            assert isinstance(r["answer"], str) and "Q:" not in r["answer"] and r["length"] >= 0
            assert r["text"].split("Q:", 1)[0].strip() == r["answer"]  # the raw text, to re-score
    plain, steered = ([r["answer"] for r in s["items"]] for s in results)
    assert plain != steered
    summary = (tmp_path / "summary.md").read_text()
    assert "| setting | n | bleu_acc | rouge1_acc | rouge2_acc | rougeL_acc | length | no_comment |" in summary


def test_folds_send_each_question_to_the_pack_fitted_without_it(job, runner, tmp_path):
    from vllm_steer.eval.folds import fold_of, write_training_split
    from vllm_steer.eval.truthfulqa_mc import evaluate_mc, load_mc_questions

    questions = load_mc_questions(job.data)
    folds_of = [fold_of(q.question, 2) for q in questions]
    assert folds_of == [fold_of(q.question, 2) for q in questions] and 0.4 < sum(folds_of) / len(folds_of) < 0.6
    n = write_training_split(job.data, 0, 2, 0, tmp_path / "train0.json")
    kept = json.loads((tmp_path / "train0.json").read_text())
    assert n == len(kept) == folds_of.count(1) and all(fold_of(e["question"], 2) == 1 for e in kept)

    folded = EvalJob(model=job.model, data=job.data, packs=job.packs, settings=(job.settings[1],), num_shards=2,
                     limit=8, engine=job.engine, folds=2)
    report = run_job(folded, tmp_path / "job", progress=False, runner=ShardRunner(folded.to_json(), llm=runner.llm))
    assert report.complete
    items = _items(tmp_path / "job")[0]["items"]
    assert {r["fold"] for r in items} == {0, 1}
    for r in items:
        assert r["fold"] == folds_of[r["item"]]
        direct = evaluate_mc(runner.llm, runner.tokenizer, [questions[r["item"]]],
                             {**job.settings[1].spec, "pack": f"tq.fold{r['fold']}"})[0]
        assert r["scores"] == pytest.approx(direct.scores, abs=1e-5)


def test_eval_command_refuses_bad_settings_before_starting_anything(tmp_path, capsys):
    from vllm_steer.cli import main

    base = ["eval", "--model", "unused", "--data", "unused.json", "--out", str(tmp_path / "o")]
    assert main(base + ["--setting", "{not json"]) == 2
    assert "--setting" in capsys.readouterr().err
    assert main(base + ["--setting", "none", "--alphas", "1,2"]) == 2
    assert "--alphas needs exactly one steered --setting" in capsys.readouterr().err
    assert main(base + ["--fit-folds", "tq"]) == 2
    assert "--fit-folds needs --folds 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_short_answer_benchmark_reports_rates_overall_and_per_group(job, runner, tmp_path):
    from vllm_steer.eval.short_answer import first_word, load_short_answer_items

    # Items whose true answer is what the unsteered tiny model says first: truthful 1 unsteered.
    from vllm import SamplingParams

    prompts = ["hello there", "the cat", "one two three", "a b c d"]
    said = [first_word(o.outputs[0].text) for o in runner.llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "true_answer": s or "none", "false_answer": "zzz",
                                        "group": ["a", "b"][i % 2], "valid_answers": [s or "none", "zzz"]}) + "\n"
                            for i, (p, s) in enumerate(zip(prompts, said))))
    assert len(load_short_answer_items(data)) == 4
    short = EvalJob(model=job.model, data=str(data), packs=job.packs, benchmark="short_answer", settings=job.settings,
                    num_shards=3, max_tokens=6, engine=job.engine)
    report = run_job(short, tmp_path / "out", progress=False, runner=ShardRunner(short.to_json(), llm=runner.llm))
    assert report.complete
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    answered = [s is not None for s in said]
    assert rows[0]["truthful"] == sum(answered) / 4 and rows[0]["well_formed"] == sum(answered) / 4
    assert rows[0]["expected_false"] == 0.0
    assert rows[0]["truthful[a]"] == sum(answered[0::2]) / 2 and rows[0]["truthful[b]"] == sum(answered[1::2]) / 2
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| setting | n | truthful | expected_false | well_formed | truthful[a] | truthful[b] |" in summary
