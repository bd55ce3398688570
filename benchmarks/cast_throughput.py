"""CAST (a condition gating residual steering) vs vanilla vLLM: throughput and prefill latency,
measured in one run on one model.

Same model and setup as ``throughput.py`` (random-weight Llama shape, ``load_format="dummy"``,
token-id prompts, greedy, ``ignore_eos``). Packs: a random residual pack on layers
``--steer-layers`` and a random condition pack reading the input of layer ``--condition-layer``.
Rows:

  vanilla      an engine whose processes load no plugin at all (VLLM_PLUGINS=none)
  plugin_idle  the plugin on (gate and steering ops installed), requests without a steering spec
  residual     every request steered by the residual pack, no condition
  cast_on      the same spec with the condition, made to hold for every prompt (the request's own
               ``comparison: below, threshold: 1.0``): the gate reads each prompt in its prefill
  cast_off     the same with a condition that never holds (``below -1.0``): read, then unsteered

Two measurements in interleaved rounds (medians): a batch of ``--num-requests`` requests (delivered
tokens/s, mean time to first token), and ``--latency-requests`` lone requests of
``--latency-prompt-len`` tokens with one output token (the prefill the gate reads). Prefix caching
is off in both engines (the rounds repeat their prompts; conditioned requests never read the cache).

    python benchmarks/cast_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench_engines import (
    add_model_args, build_model, engine_kwargs, interleaved_rounds, median_of, steering_and_vanilla_engines,
    timed_batch, token_prompts,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--latency-requests", type=int, default=16)
    parser.add_argument("--latency-prompt-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--condition-layer", type=int, default=3)
    parser.add_argument("--steer-layers", default="3,4,5")
    parser.add_argument("--alpha", type=float, default=1.0)
    add_model_args(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    from vllm import SamplingParams

    from vllm_steer.pack import save_pack
    from vllm_steer.pack.synthetic import condition_pack, random_pack

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-cast-bench-"))
    model, shape = build_model(args, work)
    steer_layers = tuple(int(x) for x in args.steer_layers.split(","))
    packs = [
        save_pack(work / "behave.safetensors",
                  random_pack(shape, "behave", num_heads_selected=0, residual_layers=steer_layers, seed=0)),
        save_pack(work / "cond.safetensors", condition_pack(
            shape, "cond", torch.randn(shape.hidden_size, generator=torch.Generator().manual_seed(1)),
            args.condition_layer, 0.5)),
    ]
    max_len = max(args.prompt_len + args.max_tokens, args.latency_prompt_len + 1) + 8
    # prefix caching off in both engines: the rounds repeat their prompts, and a conditioned request
    # never reads the cache, so with it on the other rows would be measured on cache hits
    common = engine_kwargs(args, model, max_len, args.num_requests, disable_log_stats=False,
                           enable_prefix_caching=False)
    steer_llm, vanilla_llm = steering_and_vanilla_engines(common, packs)

    n = args.num_requests
    prompts = token_prompts(n, args.prompt_len, args.vocab_size, seed=0)
    long_prompts = token_prompts(args.latency_requests, args.latency_prompt_len, args.vocab_size, seed=1)
    residual = {"pack": "behave", "method": "residual", "alpha": args.alpha}
    specs = {
        "vanilla": None, "plugin_idle": None, "residual": residual,
        "cast_on": {**residual, "condition": {"pack": "cond", "comparison": "below", "threshold": 1.0}},
        "cast_off": {**residual, "condition": {"pack": "cond", "comparison": "below", "threshold": -1.0}},
    }

    def params(name: str, max_tokens: int) -> SamplingParams:
        spec = specs[name]
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if spec else None)

    def engine(name: str):
        return vanilla_llm if name == "vanilla" else steer_llm

    names = list(specs)
    for name in names:  # warm-up: compiles every shape used below
        engine(name).generate(prompts[:8], params(name, 4), use_tqdm=False)
        engine(name).generate(long_prompts[:1], params(name, 1), use_tqdm=False)
    # the gate did what each row says: cast_on steers like residual, cast_off like no steering
    probe = prompts[:4]
    first = {name: [o.outputs[0].token_ids for o in engine(name).generate(probe, params(name, 8), use_tqdm=False)]
             for name in names}
    gate_check = {"cast_on_equals_residual": first["cast_on"] == first["residual"],
                  "cast_off_equals_plugin_idle": first["cast_off"] == first["plugin_idle"],
                  "residual_differs_from_plugin_idle": first["residual"] != first["plugin_idle"]}

    def batch(name: str) -> dict:
        return timed_batch(engine(name), prompts, params(name, args.max_tokens), n * args.max_tokens, name)

    def lone(name: str) -> dict:
        ttfts = [engine(name).generate([p], params(name, 1), use_tqdm=False)[0].metrics.first_token_latency
                 for p in long_prompts]
        return {"median_ttft_ms": 1000 * statistics.median(ttfts)}

    throughput = interleaved_rounds(names, args.rounds, batch)
    latency = interleaved_rounds(names, args.rounds, lone)
    tps = median_of(throughput, "tokens_per_s")
    batch_ttft = median_of(throughput, "mean_ttft_ms")
    lone_ttft = median_of(latency, "median_ttft_ms")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": vars(args),
        "gate_check": gate_check,
        "tokens_per_s": tps,
        "throughput_ratio_to_vanilla": {k: tps[k] / tps["vanilla"] for k in names},
        "batch_mean_ttft_ms": batch_ttft,
        "lone_median_ttft_ms": lone_ttft,
        "lone_ttft_ratio_to_vanilla": {k: lone_ttft[k] / lone_ttft["vanilla"] for k in names},
        "throughput_rounds": throughput,
        "latency_rounds": latency,
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\ncondition layer {args.condition_layer}, residual layers {list(steer_layers)}, alpha {args.alpha:g}; "
          f"batch: {n} requests x {args.prompt_len} prompt + {args.max_tokens} generated tokens; lone: "
          f"{args.latency_requests} requests x {args.latency_prompt_len} prompt tokens, 1 output token")
    print(f"gate check: {gate_check}")
    print("\n| row | tokens/s (median) | ratio | batch mean TTFT ms | lone median TTFT ms | ratio |")
    print("|---|---|---|---|---|---|")
    for k in names:
        print(f"| {k} | {tps[k]:.1f} | {tps[k] / tps['vanilla']:.3f} | {batch_ttft[k]:.1f} | "
              f"{lone_ttft[k]:.2f} | {lone_ttft[k] / lone_ttft['vanilla']:.3f} |")
    print(f"({result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not all(gate_check.values()):
        raise SystemExit(f"the gate did not do what the rows say: {gate_check}")


if __name__ == "__main__":
    main()
