"""Front-end side of activation capture: fetch results from the workers of an ``LLM``."""

from __future__ import annotations

import torch

from vllm_steer.integration.worker import COLLECT_CAPTURES_RPC


def _tensor(shape: list[int], raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(shape)


def fetch_captures(llm, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Captured tensors by key; head tensors of tensor-parallel ranks are joined in rank order."""
    per_rank = llm.collective_rpc(COLLECT_CAPTURES_RPC, args=(keys,))
    merged = {}
    for key in keys:
        parts = [{name: _tensor(*packed) for name, packed in rank[key].items()} for rank in per_rank]
        merged[key] = {
            "heads_at": torch.cat([p["heads_at"] for p in parts], dim=-1),
            "heads_mean": torch.cat([p["heads_mean"] for p in parts], dim=-1),
            "residual_at": parts[0]["residual_at"],
            "residual_mean": parts[0]["residual_mean"],
        }
    return merged
