"""Multiple-choice answer scoring under FASB semantics (TruthfulQA MC1/MC2 style), in the engine.

For each (prompt, answer) pair, as FASB's reference scores MC answers (methods.md):

1. one unsteered pass over ``prompt + answer``: the log-prob of every answer token, and the probes'
   mean P(desired) at the scanned positions ``[start + s, len)``, where ``start = len(prompt) +
   skip_first`` and ``s`` is the backtrack length;
2. at the first scanned position ``pos`` whose score is below ``threshold``, a second pass steers
   every position ``>= max(start, pos - s)`` with ITI at strength ``alpha * (1 - score)``;
3. the answer's score is the summed log-prob of its tokens from the last pass run.

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
    answer_ids: tuple[int, ...]


@dataclass(frozen=True)
class FasbMcScore:
    logprob: float  # summed log-prob of the answer tokens (steered when it fired)
    fired_at: int | None  # the scanned position that fired, None if none did
    score: float | None  # the mean P(desired) that fired
    strength: float | None  # alpha * (1 - score)


def probe_means(pack: SteerPack, heads: torch.Tensor) -> torch.Tensor:
    """Mean P(desired) over the pack's probes for activations ``heads`` [N, L, H, D] -> [N]."""
    if pack.probe_weights is None:
        raise SteeringError(f"pack {pack.name!r} has no probes", field="pack")
    a = heads[:, pack.head_layers.long(), pack.head_indices.long()]  # [N, K, D]
    logits = (a * pack.probe_weights).sum(-1) + pack.probe_biases
    return torch.sigmoid(logits).mean(-1)


def _answer_logprob(output, answer_from: int, token_ids: Sequence[int]) -> float:
    entries = output.prompt_logprobs
    return float(sum(entries[t][token_ids[t]].logprob for t in range(answer_from, len(token_ids))))


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
        scans = [list(range(start + backtrack, len(t))) for start, t in zip(starts, tokens)]
        keys = [f"fasbmc-{run}-{first + i}" for i in range(len(batch))]
        params = [
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args={
                CAPTURE_KEY: {"key": key, "positions": scan or [len(t) - 1]}})
            for key, scan, t in zip(keys, scans, tokens)
        ]
        plain = llm.generate([{"prompt_token_ids": t} for t in tokens], params, use_tqdm=False)
        captured = fetch_captures(llm, keys)

        fired: list[tuple[int, int, float]] = []  # (batch index, position, score)
        results: list[FasbMcScore | None] = []
        for i, (a, t, scan, key) in enumerate(zip(batch, tokens, scans, keys)):
            logprob = _answer_logprob(plain[i], len(a.prompt_ids), t)
            results.append(FasbMcScore(logprob, None, None, None))
            if not scan:
                continue
            heads = captured[key]["heads_at"].view(len(scan), L, H, D)
            p = probe_means(pack, heads)
            below = torch.nonzero(p < threshold).flatten()
            if below.numel():
                j = int(below[0])
                fired.append((i, scan[j], float(p[j])))

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
                logprob = _answer_logprob(out, len(batch[i].prompt_ids), tokens[i])
                results[i] = FasbMcScore(logprob, pos, score, alpha * (1.0 - score))
        scores.extend(results)
    return scores
