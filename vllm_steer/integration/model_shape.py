"""Read our own shape types (ModelShape, RankLayout) off vLLM's configs."""

from __future__ import annotations

from typing import Any

from vllm_steer.engine.steering_table import RankLayout
from vllm_steer.pack import ModelShape
from vllm_steer.pack.hf_shape import shape_from_hf_config


def model_shape_of(model_config: Any) -> ModelShape:
    """The ModelShape of a vLLM ``ModelConfig`` (read from its HF text config)."""
    return shape_from_hf_config(
        model_config.hf_text_config, getattr(model_config.hf_config, "architectures", None)
    )


def rank_layout_of(shape: ModelShape) -> RankLayout:
    """This process's slice of heads under tensor parallelism."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    tp_size = get_tensor_model_parallel_world_size()
    if shape.num_heads % tp_size:
        raise ValueError(f"{shape.num_heads} heads do not split over tensor-parallel size {tp_size}")
    return RankLayout(
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        head_dim=shape.head_dim,
        hidden_size=shape.hidden_size,
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=tp_size,
    )
