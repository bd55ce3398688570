"""What one L2S training target is made of: a prompt and its desired and undesired texts.

Two forms of data give them:

* **completions** (any dataset ``fit.datasets.load_dataset`` reads): the desired and undesired texts
  are the prompt followed by its label-1 and label-0 completions. The target can then be read at the
  last token or averaged over the completion's tokens.
* **contrastive prompts** (the P2S form of the L2S paper): JSONL rows
  ``{"prompt": X, "positive_prompt": X+, "negative_prompt": X-}`` where X+ and X- are X rewritten to
  carry the desired and the undesired behaviour (e.g. another instruction or speaker), not X with
  something appended. The target is read at the last token of X+ and X-. Either may be a list of
  rewritings; the target then averages over each list.

In both forms the predictor reads the raw prompt X at its last token (with the fit's
``chat_template`` option: X, X+ and X- rendered as a one-user-message chat with the generation
prompt, the completions appended after X's rendering; ``fit.l2s_pipeline``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vllm_steer.fit.datasets import DatasetError, jsonl_objects, load_dataset


@dataclass(frozen=True)
class L2SContrast:
    prompt: str
    desired: tuple[str, ...]  # whole texts whose stream at L* is averaged into h+
    undesired: tuple[str, ...]  # ... into h-
    extends_prompt: bool  # the texts are the prompt + a completion (so "average" has a span)


PROMPT_PAIR_KEYS = ("positive_prompt", "negative_prompt")


def load_l2s_contrasts(path: str | Path) -> list[L2SContrast]:
    """The dataset's contrasts, one per distinct prompt that has both a desired and an undesired text."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl" and _has_prompt_pairs(p):
        return _load_prompt_pairs(p)
    examples = load_dataset(p)
    grouped: dict[tuple[str, str], dict[int, list[str]]] = {}
    for ex in examples:
        # the texts must start with the prompt: the chat-template fit cuts the prompt off and renders it
        grouped.setdefault((ex.group, ex.prompt), {0: [], 1: []})[ex.label].append(ex.prompt + ex.completion)
    return [L2SContrast(prompt, tuple(sides[1]), tuple(sides[0]), True)
            for (_, prompt), sides in grouped.items() if sides[0] and sides[1]]


def _has_prompt_pairs(p: Path) -> bool:
    try:
        with p.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and any(k in obj for k in PROMPT_PAIR_KEYS)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # load_dataset reports the problem with its line and column
    return False


def _load_prompt_pairs(p: Path) -> list[L2SContrast]:
    out = []
    for _, where, obj in jsonl_objects(p):
        texts = {}
        for key in ("prompt", *PROMPT_PAIR_KEYS):
            value = obj.get(key)
            values = value if isinstance(value, list) and key != "prompt" else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise DatasetError(f"{where}: {key!r} must be a non-empty string"
                                   f"{'' if key == 'prompt' else ' or a non-empty list of them'} (a contrastive-"
                                   f"prompt file needs 'prompt', 'positive_prompt' and 'negative_prompt' on every "
                                   f"line)", field=key)
            texts[key] = tuple(values)
        out.append(L2SContrast(texts["prompt"][0], texts["positive_prompt"], texts["negative_prompt"], False))
    return out  # never empty: jsonl_objects refuses a file without a line
