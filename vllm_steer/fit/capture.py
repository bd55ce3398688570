"""Capture activations through vLLM itself (batched), for fitting probes and steering vectors.

A capture engine is a plain ``LLM`` started with ``additional_config={"steering": {"capture": True}}``,
``enforce_eager=True`` and prefix caching off (``capture_engine`` builds one). Each item's tokens are
prefilled once (``max_tokens=1``); the workers keep, for every layer, the per-head attention output
(o_proj input) and the residual stream (decoder-layer output) at the item's positions and their mean
over ``[mean_from, len)``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from vllm_steer.engine.activation_capture import CAPTURE_KEY
from vllm_steer.pack import ModelShape

CAPTURE_MAX_NUM_SEQS = 64  # items prefilled together; capture_activations queues the rest of a batch


@dataclass(frozen=True)
class CaptureItem:
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]  # absolute positions in token_ids; the same count for every item
    mean_from: int | None = None  # mean over [mean_from, len(token_ids))


@dataclass
class CapturedActivations:
    heads_at: torch.Tensor  # [N, P, L, H, D]
    residual_at: torch.Tensor  # [N, P, L, hidden]
    heads_mean: torch.Tensor | None  # [N, L, H, D]
    residual_mean: torch.Tensor | None  # [N, L, hidden]


def capture_engine(model: str, **llm_kwargs):
    """An ``LLM`` set up for capture (eager, no prefix caching, plugin in capture mode), sized for a
    capture job (``integration.job_engine``): ``max_model_len`` the model's own limit (at most 1024),
    ``max_num_seqs`` CAPTURE_MAX_NUM_SEQS, float32 and a KV cache for that, unless ``llm_kwargs`` say
    otherwise."""
    from vllm import LLM

    from vllm_steer.integration.job_engine import engine_settings_errors, job_engine_kwargs

    config = llm_kwargs.pop("additional_config", {}) or {}
    steering = dict(config.get("steering", {}))
    steering["capture"] = True
    kwargs = job_engine_kwargs(
        model, max_model_len=None, max_num_seqs=CAPTURE_MAX_NUM_SEQS, dtype="float32",
        user_kwargs={"enforce_eager": True, "enable_prefix_caching": False, "seed": 0, **llm_kwargs},
    )
    with engine_settings_errors():
        return LLM(model=model, additional_config={**config, "steering": steering}, **kwargs)


def capture_activations(
    llm, items: Sequence[CaptureItem], shape: ModelShape, *, batch_size: int = 128, progress: bool = True
) -> CapturedActivations:
    from vllm import SamplingParams

    from vllm_steer.integration.capture_client import fetch_captures

    if not items:
        raise ValueError("capture_activations needs at least one item")
    num_positions = len(items[0].positions)
    if any(len(it.positions) != num_positions for it in items):
        raise ValueError("every CaptureItem must list the same number of positions")
    with_mean = items[0].mean_from is not None
    if any((it.mean_from is not None) != with_mean for it in items):
        raise ValueError("give mean_from for every CaptureItem or for none")
    L, H, D, hidden = shape.num_layers, shape.num_heads, shape.head_dim, shape.hidden_size
    n = len(items)
    heads_at = torch.empty(n, num_positions, L, H, D)
    residual_at = torch.empty(n, num_positions, L, hidden)
    heads_mean = torch.empty(n, L, H, D) if with_mean else None
    residual_mean = torch.empty(n, L, hidden) if with_mean else None
    run = uuid.uuid4().hex[:8]
    bar = tqdm(total=n, desc="capture", unit="item", disable=not progress)
    for start in range(0, n, batch_size):
        chunk = items[start : start + batch_size]
        keys = [f"{run}-{start + i}" for i in range(len(chunk))]
        params = [
            SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_KEY: {
                "key": key, "positions": list(it.positions),
                **({"mean_from": it.mean_from} if it.mean_from is not None else {}),
            }})
            for key, it in zip(keys, chunk)
        ]
        llm.generate([{"prompt_token_ids": list(it.token_ids)} for it in chunk], params, use_tqdm=False)
        got = fetch_captures(llm, keys)
        for i, key in enumerate(keys):
            row = start + i
            heads_at[row] = got[key]["heads_at"].view(num_positions, L, H, D)
            residual_at[row] = got[key]["residual_at"]
            if with_mean:
                heads_mean[row] = got[key]["heads_mean"].view(L, H, D)
                residual_mean[row] = got[key]["residual_mean"]
        bar.update(len(chunk))
    bar.close()
    return CapturedActivations(heads_at, residual_at, heads_mean, residual_mean)
