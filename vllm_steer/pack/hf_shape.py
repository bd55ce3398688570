"""The ModelShape of a Hugging Face config or checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.pack.manifest import ModelShape


def shape_from_hf_config(text_config: Any, architectures: list[str] | None = None) -> ModelShape:
    """``text_config`` is the decoder's config (for plain LMs, the config itself)."""
    num_heads = text_config.num_attention_heads
    architectures = architectures or getattr(text_config, "architectures", None) or [type(text_config).__name__]
    return ModelShape(
        architecture=architectures[0],
        num_layers=text_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
        hidden_size=text_config.hidden_size,
    )


def shape_of_checkpoint(path: str | Path) -> ModelShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return shape_from_hf_config(text_config, getattr(config, "architectures", None))
