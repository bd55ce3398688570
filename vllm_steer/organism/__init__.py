"""The model organism: a small Llama trained offline on a generated world where a behaviour
(answering truthfully vs. lying) is carried by the activations and never by an explicit token.

- ``world``: the world (invented entities, attributes, true and false facts, optional speakers),
  the word-level tokenizer, training documents, held-out evaluation prompts and contrastive pairs.
- ``train``: ``train_organism`` / ``cached_organism`` (plain torch on CPU, deterministic).
- ``evaluate``: greedy evaluation and backend-free scoring (``score_answers``).

The benchmarks that run steering on it live in ``benchmarks/organism/``; ``vllm-steer demo`` uses the
checkpoint shipped in ``vllm_steer/organism/checkpoint/``.
"""

from .world import World, WorldConfig, build_tokenizer, contrastive_pairs

__all__ = ["World", "WorldConfig", "build_tokenizer", "contrastive_pairs"]
