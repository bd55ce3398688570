"""The evaluation job: in-process vs 2 Ray actors, an actor killed mid-job, and the resume."""

from __future__ import annotations

import json

import pytest

from conftest import close_llm, truthfulqa_dir
from vllm_steer.eval.job import EvalJob, Setting, ShardRunner, run_job, shard_ranges
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack


def test_shards_cover_every_item_once():
    for n, k in ((10, 3), (3, 5), (0, 2), (7, 7)):
        ranges = shard_ranges(n, k)
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= 1


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    pack = save_pack(tmp_path_factory.mktemp("evalpack") / "tq.safetensors",
                     random_pack(shape_of_checkpoint(path), "tq", num_heads_selected=6, seed=3, sigma_scale=4.0))
    return EvalJob(model=str(path), data=str(truthfulqa_dir() / "mc_task.json"), packs=(str(pack),),
                   settings=(Setting(None), Setting({"pack": "tq", "method": "iti", "alpha": 6.0})),
                   num_shards=3, limit=6,
                   engine={"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 16})


@pytest.fixture(scope="module")
def runner(job):
    """The in-process runner (one engine), shared by the tests of this module."""
    runner = ShardRunner(job.to_json())
    yield runner
    close_llm(runner.llm)


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

    # Two actors; the first actor to finish a unit is killed right after it, so the units queued
    # behind it fail and are reported; the other actor goes on.
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
        # The resumed job redoes only the missing units, on fresh actors.
        second = run_job(job, out, num_actors=2, progress=False)
        assert second.complete and second.skipped == first.done and second.done == 6 - first.done
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert _items(out) == expected


def test_a_folder_holding_another_job_is_refused(job, tmp_path):
    from vllm_steer.errors import SteeringError

    other = EvalJob(model=job.model, data=job.data, settings=(Setting(None),), num_shards=2, limit=2)
    (tmp_path / "job.json").write_text(json.dumps(job.to_json()))
    with pytest.raises(SteeringError, match="another job"):
        run_job(other, tmp_path, progress=False)


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
            assert r["bleu_acc"] in (0.0, 1.0) and r["rouge_acc"] in (0.0, 1.0) and r["no_comment"] in (0.0, 1.0)
            assert isinstance(r["answer"], str) and "Q:" not in r["answer"] and r["length"] >= 0
    plain, steered = ([r["answer"] for r in s["items"]] for s in results)
    assert plain != steered
    summary = (tmp_path / "summary.md").read_text()
    assert "| setting | n | bleu_acc | rouge_acc | length | no_comment |" in summary
