"""What the steered-vs-vanilla benchmarks share: the random-weight model, the two engines (one with the
plugin, one whose processes load no plugin at all), token-id prompts, and interleaved rounds.

Engines are built in this order because the front-end process loads vLLM plugins once, at its first
engine: the plugin engine first, then ``VLLM_PLUGINS=none`` for the processes the vanilla engine
spawns.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable


def add_model_args(parser) -> None:
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=1408)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")


def build_model(args, work: Path):
    """A config-only Llama checkpoint (vLLM loads it with ``load_format="dummy"``); returns (path, shape)."""
    from vllm_steer.models.tiny_checkpoint import write_config_only
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    model = write_config_only(
        work / "model", "llama", hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
    )
    return model, shape_of_checkpoint(model)


def engine_kwargs(args, model: Path, max_model_len: int, max_num_seqs: int, **extra) -> dict:
    return dict(
        model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(2048, max_num_seqs * 2), seed=0, enforce_eager=args.enforce_eager, **extra,
    )


def steering_and_vanilla_engines(common: dict, packs: list[Path]):
    """(engine with the plugin and ``packs``, engine without any plugin) on the same arguments."""
    from vllm import LLM

    steer = LLM(**common, additional_config={"steering": {"packs": [str(p) for p in packs]}})
    os.environ["VLLM_PLUGINS"] = "none"
    try:
        vanilla = LLM(**common)
    finally:
        del os.environ["VLLM_PLUGINS"]
    return steer, vanilla


def token_prompts(n: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, vocab_size) for _ in range(prompt_len)]} for _ in range(n)]


def interleaved_rounds(names: list[str], rounds: int, run: Callable[[str], dict]) -> dict[str, list[dict]]:
    """``run(name)`` for every row, ``rounds`` times; round r starts r rows later, so drifts of a shared
    machine hit every row alike. ``run`` returns a dict of measurements; printed as they come."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            measured = run(name)
            measured.setdefault("seconds", time.perf_counter() - t0)
            results[name].append(measured)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in measured.items() if isinstance(v, (int, float)))
            print(f"round {r} {name:12s} {shown}", flush=True)
    return results


def timed_batch(llm, prompts: list, params, expected_tokens: int, label: str) -> dict:
    """One ``generate`` of ``prompts`` (one ``params`` each, or the same for all): delivered tokens/s
    (checked: exactly ``expected_tokens`` delivered), the seconds, and the mean time to first token
    when the engine keeps request metrics."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == expected_tokens, f"{label}: {tokens} tokens delivered, expected {expected_tokens}"
    measured = {"tokens_per_s": tokens / elapsed, "seconds": elapsed}
    if all(o.metrics is not None for o in outs):  # engines started with disable_log_stats=False
        measured["mean_ttft_ms"] = 1000 * statistics.mean(o.metrics.first_token_latency for o in outs)
    return measured


def median_of(results: dict[str, list[dict]], key: str) -> dict[str, float]:
    return {name: statistics.median(m[key] for m in rows) for name, rows in results.items()}
