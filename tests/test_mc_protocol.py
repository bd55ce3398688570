"""The MC protocol (``eval.mc_protocol``), FASB MC's checked positions (``eval.fasb_mc``) and the fixed
probe C option, without an engine."""

from __future__ import annotations

import pytest

from vllm_steer.errors import SteeringError
from vllm_steer.eval.fasb_mc import checked_positions
from vllm_steer.eval.mc_protocol import McProtocol


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model("llama")))


@pytest.mark.parametrize("answer_len, skip, s, expected", [
    (12, 4, 2, list(range(12, 18))),  # prompt 6: start 10, checks from start + s = 12 to the last, 17
    (7, 4, 2, [12]),  # the last position is start + s
    (6, 4, 2, [11]),  # the last position lies in the skipped stretch: still checked
    (5, 4, 2, [10]),  # ... also when it is start itself
    (4, 4, 2, []),  # the answer ends before start: the reference's scan range(start, T) is empty
    (1, 4, 10, []),
    (14, 4, 10, [19]),  # s = 10 (FASB's default) with a 14-token answer: only the last position
    (15, 4, 10, [20]),
    (16, 4, 10, [20, 21]),
    (6, 4, 0, [10, 11]),  # s = 0: every position from start on
    (3, 0, 10, [8]),
])
def test_checked_positions_always_include_the_answers_last(answer_len, skip, s, expected):
    assert checked_positions(6, answer_len, skip, s) == expected


def test_the_default_format_is_itis_prompt(tokenizer):
    p = McProtocol()
    assert p.prompt("Why is the sky blue?") == "Q: Why is the sky blue? A:"
    a = p.tokens(tokenizer, "Why is the sky blue?", "Because of scattering.")
    assert list(a.prompt_ids) == tokenizer("Q: Why is the sky blue? A:")["input_ids"]
    assert list(a.prompt_ids + a.answer_ids) == tokenizer("Q: Why is the sky blue? A: Because of scattering.")["input_ids"]
    assert a.score_from == 0 and p.steer_from(len(a.prompt_ids)) == len(a.prompt_ids) - 1


def test_the_qa_format_is_the_references(tokenizer):
    instruction, primer = "Answer truly.", "Q: Is ice cold?\nA: Yes."
    p = McProtocol(answer_format="qa", instruction=instruction, primer=primer)
    head = "Answer truly.\n\nQ: Is ice cold?\nA: Yes.\n\nQ: Why is the sky blue?"
    assert p.prompt("Why is the sky blue?") == head
    a = p.tokens(tokenizer, "Why is the sky blue?", "Because of scattering.")
    assert list(a.prompt_ids) == tokenizer(head)["input_ids"]
    assert list(a.prompt_ids + a.answer_ids) == tokenizer(head + "\nA: Because of scattering.")["input_ids"]
    marker = len(tokenizer(head + "\nA:")["input_ids"]) - len(a.prompt_ids)
    assert a.score_from == marker > 0  # "\nA:" is not scored
    every = McProtocol(answer_format="qa", instruction=instruction, primer=primer, scored="continuation")
    assert every.tokens(tokenizer, "Why is the sky blue?", "Because of scattering.").score_from == 0
    assert p.steer_from(20) == 24 and McProtocol(answer_format="qa", start_offset=1).steer_from(20) == 21
    assert McProtocol(answer_format="iti", instruction=instruction).prompt("Q?") == "Answer truly.\n\nQ: Q? A:"


@pytest.mark.parametrize("kwargs, field", [
    ({"answer_format": "paper"}, "mc_format"),
    ({"scored": "all"}, "mc_scored"),
    ({"start_offset": -1}, "mc_start_offset"),
    ({"start_offset": 2.5}, "mc_start_offset"),
    ({"start_offset": True}, "mc_start_offset"),
])
def test_bad_protocol_values_name_their_field(kwargs, field):
    with pytest.raises(SteeringError) as err:
        McProtocol(**kwargs)
    assert err.value.field == field


def test_a_job_checks_its_protocol_and_keeps_resuming_old_folders(tmp_path):
    import json

    from vllm_steer.eval.job import EvalJob, _check_folder

    with pytest.raises(SteeringError) as err:
        EvalJob(model="m", data="d", mc_format="x")
    assert err.value.field == "mc_format"
    with pytest.raises(SteeringError) as err:
        EvalJob(model="m", data="d", benchmark="truthfulqa_gen", mc_start_offset=1)
    assert err.value.field == "mc_start_offset"
    job = EvalJob(model="m", data="d")
    old = {k: v for k, v in job.to_json().items() if not k.startswith("mc_")}  # a job.json from before
    (tmp_path / "job.json").write_text(json.dumps(old))
    _check_folder(job, tmp_path)  # same job: resumes
    with pytest.raises(SteeringError, match="another job"):
        _check_folder(EvalJob(model="m", data="d", mc_format="qa"), tmp_path)


@pytest.mark.parametrize("c", [0.0, -1.0, float("inf"), float("nan"), True])
def test_fit_refuses_a_bad_probe_c(tiny_model, c):
    from vllm_steer.fit.pipeline import FitOptions
    from vllm_steer.integration.job_engine import checkpoint_facts

    with pytest.raises(SteeringError) as err:
        FitOptions(name="x", probe_c=c).check(checkpoint_facts(str(tiny_model("llama"))))
    assert err.value.field == "probe_c"


def test_fixed_c_fits_every_probe_at_that_c():
    import torch

    from vllm_steer.fit.probes import train_head_probes

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    features = torch.randn(40, 2, 2, 4, generator=gen) + labels[:, None, None, None] * 0.7
    fixed = train_head_probes(features, labels, list(range(30)), list(range(30, 40)), l2_grid=(1.0,), progress=False)
    assert fixed.c_grid == (1.0,) and bool((fixed.c == 1.0).all())
    grid = train_head_probes(features, labels, list(range(30)), list(range(30, 40)), progress=False)
    i = grid.c_grid.index(1.0)
    assert torch.allclose(grid.val_accuracy_by_c[i], fixed.val_accuracy)
