"""TruthfulQA multiple choice through the engine: every answer's score under one setting's steering
semantics, then MC1/MC2/MC3 per question.

How an item becomes tokens is an ``eval.mc_protocol.McProtocol``: by default ITI's prompt
``"Q: {question} A:"`` and the answer ``" {answer}"``; the protocol of FASB's released MC loop
(instruction, primer, ``"Q: {question}\nA: {answer}"``, start offset 4, answer tokens scored) by
options. An answer's score is the summed log-prob of its scored tokens, read from one
prompt-logprobs pass over prompt + answer. Settings:

* ``None``: unsteered;
* ``{"pack", "method": "iti" | "residual", "alpha", ...}``: steered from ``protocol.steer_from``
  (the last prompt token by default) on, so every answer token's log-prob is computed under
  steering, as ITI scores MC;
* ``{"pack", "method": "fasb", "alpha", "threshold", "backtrack"}``: FASB's two-pass scoring
  (``eval.fasb_mc``) with ``skip_first = protocol.start_offset``; needs a capture engine that loads
  the pack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vllm_steer.eval.fasb_mc import McAnswer, fasb_answer_logprobs
from vllm_steer.eval.mc_metrics import mc1, mc2, mc3
from vllm_steer.eval.mc_protocol import McProtocol
from vllm_steer.fit.datasets import DatasetError


@dataclass(frozen=True)
class McQuestion:
    question: str
    mc1: tuple[tuple[str, int], ...]  # (answer, 1 for the single correct one)
    mc2: tuple[tuple[str, int], ...]  # (answer, 1 for every true one)


@dataclass(frozen=True)
class McResult:
    question: str
    mc1: float
    mc2: float
    mc3: float
    scores: dict[str, float]  # answer -> summed log-prob


def _targets(entry: Any, key: str, where: str, single_true: bool) -> tuple[tuple[str, int], ...]:
    targets = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(targets, dict) or not targets:
        raise DatasetError(f"{where}: '{key}' must be a non-empty object answer -> 0/1", field=key)
    out = []
    for answer, label in targets.items():
        if label not in (0, 1) or isinstance(label, bool) or not str(answer).strip():
            raise DatasetError(f"{where}: '{key}'[{answer!r}] must map a non-empty answer to 0 or 1", field=key)
        out.append((str(answer), int(label)))
    trues = sum(label for _, label in out)
    if trues == 0 or trues == len(out) or (single_true and trues != 1):
        want = "exactly one true answer" if single_true else "at least one true and one false answer"
        raise DatasetError(f"{where}: '{key}' needs {want}", field=key)
    return tuple(out)


def load_mc_questions(path: str | Path) -> list[McQuestion]:
    """TruthfulQA's ``mc_task.json``: ``[{"question", "mc1_targets", "mc2_targets"}, ...]``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read it as JSON: {exc}", field=str(path)) from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a list of questions", field=str(path))
    questions = []
    for i, entry in enumerate(raw):
        where = f"{path} entry {i}"
        question = entry.get("question") if isinstance(entry, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: 'question' must be a non-empty string", field="question")
        questions.append(McQuestion(question, _targets(entry, "mc1_targets", where, True),
                                    _targets(entry, "mc2_targets", where, False)))
    return questions


def answer_scores(llm, answers: Sequence[McAnswer], setting: dict | None, pack=None,
                  protocol: McProtocol = McProtocol()) -> list[float]:
    """Summed log-prob of each answer's scored tokens after its prompt under ``setting`` (module doc)."""
    from vllm import SamplingParams

    if setting is not None and setting.get("method") == "fasb":
        if pack is None:
            raise ValueError("FASB scoring needs the pack object (and a capture engine that loads it)")
        knobs = {k: setting[k] for k in ("threshold", "backtrack") if k in setting}
        return [s.logprob for s in fasb_answer_logprobs(llm, pack, answers, alpha=setting["alpha"],
                                                        skip_first=protocol.start_offset, **knobs)]
    params = []
    for a in answers:
        extra = None
        if setting is not None:
            extra = {"steering": {**setting, "steer_from": protocol.steer_from(len(a.prompt_ids))}}
        params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=extra))
    outputs = llm.generate([{"prompt_token_ids": list(a.prompt_ids) + list(a.answer_ids)} for a in answers],
                           params, use_tqdm=False)
    scores = []
    for a, out in zip(answers, outputs):
        ids = list(a.prompt_ids) + list(a.answer_ids)
        first = len(a.prompt_ids) + a.score_from
        scores.append(float(sum(out.prompt_logprobs[t][ids[t]].logprob for t in range(first, len(ids)))))
    return scores


def evaluate_mc(llm, tokenizer, questions: Sequence[McQuestion], setting: dict | None, pack=None,
                protocol: McProtocol = McProtocol()) -> list[McResult]:
    """MC1/MC2/MC3 of every question under ``setting``; each distinct answer is scored once."""
    index: dict[tuple[int, str], int] = {}
    tokens: list[McAnswer] = []
    for q_i, q in enumerate(questions):
        for answer, _ in q.mc1 + q.mc2:
            if (q_i, answer) not in index:
                index[(q_i, answer)] = len(tokens)
                tokens.append(protocol.tokens(tokenizer, q.question, answer))
    scores = answer_scores(llm, tokens, setting, pack, protocol)
    results = []
    for q_i, q in enumerate(questions):
        s = {answer: scores[index[(q_i, answer)]] for answer, _ in q.mc1 + q.mc2}
        correct = [s[a] for a, label in q.mc1 if label]
        others = [s[a] for a, label in q.mc1 if not label]
        true = [s[a] for a, label in q.mc2 if label]
        false = [s[a] for a, label in q.mc2 if not label]
        results.append(McResult(q.question, mc1(correct[0], others), mc2(true, false), mc3(true, false), s))
    return results
