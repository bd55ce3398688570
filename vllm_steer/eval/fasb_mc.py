"""Multiple-choice answer scoring under FASB semantics (TruthfulQA MC1/MC2 style), in the engine.

Positions are indices into the full token sequence ``prompt + answer`` (length T); the activation
"at position p" is the per-head input of ``o_proj`` computed for token p (it sees tokens 0..p and
predicts token p + 1). For each (prompt, answer) pair, as FASB's released MC loop scores answers:

1. one unsteered pass over ``prompt + answer``: the log-prob of every scored answer token, and the
   probes' mean P(desired) at the *checked* positions (:func:`checked_positions`): with
   ``start = len(prompt) + skip_first`` and ``s`` the backtrack length, every position in
   ``[start + s, T)``, plus the last position ``T - 1`` always (the first ``s`` positions from
   ``start`` are skipped except the last one). When the whole answer lies before ``start``
   (``T - 1 < start``) nothing is checked, as in the reference, whose scan is ``range(start, T)``;
   nothing could be steered there anyway (steering starts at ``start``);
2. at the first checked position ``pos`` (in order) whose score is below ``threshold``, a second pass
   steers every position ``>= max(start, pos - s)`` with ITI at strength ``alpha * (1 - score)``;
3. the answer's score is the summed log-prob of its scored tokens (``answer_ids[score_from:]``; all
   of them by default) from the last pass run.

Pass 1 reads the per-head activations through activation capture, so ``llm`` must be a capture
engine that also loads the pack (``fit.capture.capture_engine(model, additional_config={"steering":
{"packs": [path]}})``). Both passes are batched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

import torch

from vllm_steer.engine.activation_capture import CAPTURE_KEY
from vllm_steer.errors import SteeringError
from vllm_steer.pack import SteerPack


@dataclass(frozen=True)
class McAnswer:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # everything after the prompt (the answer, after any "\nA:" marker)
    score_from: int = 0  # answer_ids[score_from:] are the scored tokens (e.g. past a "\nA:" marker)


@dataclass(frozen=True)
class FasbMcScore:
    logprob: float  # summed log-prob of the scored answer tokens (steered when it fired)
    fired_at: int | None  # the checked position that fired, None if none did
    score: float | None  # the mean P(desired) that fired
    strength: float | None  # alpha * (1 - score)
    checked: int = 0  # how many positions were checked


def checked_positions(prompt_len: int, answer_len: int, skip_first: int, backtrack: int) -> list[int]:
    """The positions FASB's MC scoring checks, in order (module docstring, step 1)."""
    start, last = prompt_len + skip_first, prompt_len + answer_len - 1
    if last < start:
        return []
    return [p for p in range(start + backtrack, last)] + [last]


def probe_means(pack: SteerPack, heads: torch.Tensor) -> torch.Tensor:
    """Mean P(desired) over the pack's probes for activations ``heads`` [N, L, H, D] -> [N]."""
    if pack.probe_weights is None:
        raise SteeringError(f"pack {pack.name!r} has no probes", field="pack")
    a = heads[:, pack.head_layers.long(), pack.head_indices.long()]  # [N, K, D]
    logits = (a * pack.probe_weights).sum(-1) + pack.probe_biases
    return torch.sigmoid(logits).mean(-1)


def _answer_logprob(output, answer: McAnswer) -> float:
    token_ids = list(answer.prompt_ids) + list(answer.answer_ids)
    entries = output.prompt_logprobs
    first = len(answer.prompt_ids) + answer.score_from
    return float(sum(entries[t][token_ids[t]].logprob for t in range(first, len(token_ids))))


def fasb_answer_logprobs(
    llm,
    pack: SteerPack,
    answers: Sequence[McAnswer],
    *,
    alpha: float,
    threshold: float = 0.5,
    backtrack: int = 10,
    skip_first: int = 4,
    batch_size: int = 64,
) -> list[FasbMcScore]:
    from vllm import SamplingParams

    from vllm_steer.integration.capture_client import fetch_captures

    L, H = pack.manifest.model.num_layers, pack.manifest.model.num_heads
    D = pack.manifest.model.head_dim
    scores: list[FasbMcScore] = []
    run = uuid.uuid4().hex[:8]
    for first in range(0, len(answers), batch_size):
        batch = answers[first : first + batch_size]
        tokens = [list(a.prompt_ids) + list(a.answer_ids) for a in batch]
        starts = [len(a.prompt_ids) + skip_first for a in batch]
        checks = [checked_positions(len(a.prompt_ids), len(a.answer_ids), skip_first, backtrack) for a in batch]
        keys = [f"fasbmc-{run}-{first + i}" for i in range(len(batch))]
        params = [  # capture needs a position: an answer with none checked captures its last, unread
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args={
                CAPTURE_KEY: {"key": key, "positions": check or [len(t) - 1]}})
            for key, check, t in zip(keys, checks, tokens)
        ]
        plain = llm.generate([{"prompt_token_ids": t} for t in tokens], params, use_tqdm=False)
        captured = fetch_captures(llm, keys)

        fired: list[tuple[int, int, float]] = []  # (batch index, position, score)
        results: list[FasbMcScore] = []
        for i, (a, check, key) in enumerate(zip(batch, checks, keys)):
            results.append(FasbMcScore(_answer_logprob(plain[i], a), None, None, None, len(check)))
            if not check:
                continue
            heads = captured[key]["heads_at"].view(len(check), L, H, D)
            p = probe_means(pack, heads)
            below = torch.nonzero(p < threshold).flatten()
            if below.numel():
                j = int(below[0])
                fired.append((i, check[j], float(p[j])))

        if fired:
            steered_params = [
                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args={"steering": {
                    "pack": pack.name, "method": "iti", "alpha": alpha * (1.0 - score),
                    "steer_from": max(starts[i], pos - backtrack)}})
                for i, pos, score in fired
            ]
            steered = llm.generate([{"prompt_token_ids": tokens[i]} for i, _, _ in fired], steered_params,
                                   use_tqdm=False)
            for (i, pos, score), out in zip(fired, steered):
                results[i] = FasbMcScore(_answer_logprob(out, batch[i]), pos, score, alpha * (1.0 - score),
                                         len(checks[i]))
        scores.extend(results)
    return scores
