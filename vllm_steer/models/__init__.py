"""Small checkpoints the project builds itself (no hub on our machines)."""

from vllm_steer.models.tiny_checkpoint import build_tiny_checkpoint, cached_tiny_checkpoint, write_config_only

__all__ = ["build_tiny_checkpoint", "cached_tiny_checkpoint", "write_config_only"]
