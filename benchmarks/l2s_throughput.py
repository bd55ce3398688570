"""L2S batches vs vanilla vLLM: throughput and time to first token, measured in one run on one model.

Same model and setup as ``throughput.py`` (random-weight Llama shape, ``load_format="dummy"``,
token-id prompts, greedy, ``ignore_eos``). The pack is a random L2S pack: predictor reading layer L'
(``--read-layer``), steering layer L* (``--steer-layer``), width K (``--width``). Rows:

  vanilla      an engine whose processes load no plugin at all (VLLM_PLUGINS=none)
  plugin_idle  the plugin on (L2S hooks installed), requests without a steering spec
  l2s          the plugin on, every request ``method: "l2s"``: the predictor runs in each request's
               prefill step and its vector steers its prompt and generated tokens

Two measurements, each in interleaved rounds (round r starts r rows later), medians reported:

  throughput   ``--num-requests`` requests in one ``generate``; delivered tokens/s, and the mean
               time to first token (vLLM's per-request ``first_token_latency``: arrival to first
               token, queueing behind the batch's prefills included)
  latency      ``--latency-requests`` requests one at a time, with ``--latency-prompt-len`` tokens
               and one output token: the median time to first token of a lone request (its prefill)

    python benchmarks/l2s_throughput.py
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
    parser.add_argument("--read-layer", type=int, default=2)
    parser.add_argument("--steer-layer", type=int, default=4)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=1.0)
    add_model_args(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import SamplingParams

    from vllm_steer.pack import save_pack
    from vllm_steer.pack.synthetic import random_pack

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-l2s-bench-"))
    model, shape = build_model(args, work)
    pack = save_pack(work / "l2s.safetensors", random_pack(
        shape, "l2s", num_heads_selected=0, l2s=(args.read_layer, args.steer_layer, args.width), seed=0))
    max_len = max(args.prompt_len + args.max_tokens, args.latency_prompt_len + 1) + 8
    common = engine_kwargs(args, model, max_len, args.num_requests, disable_log_stats=False)
    steer_llm, vanilla_llm = steering_and_vanilla_engines(common, [pack])

    n = args.num_requests
    prompts = token_prompts(n, args.prompt_len, args.vocab_size, seed=0)
    long_prompts = token_prompts(args.latency_requests, args.latency_prompt_len, args.vocab_size, seed=1)
    spec = {"pack": "l2s", "method": "l2s", "alpha": args.alpha}

    def params(steered: bool, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if steered else None)

    rows = {"vanilla": (vanilla_llm, False), "plugin_idle": (steer_llm, False), "l2s": (steer_llm, True)}
    for llm, steered in rows.values():  # warm-up: compiles every shape used below
        llm.generate(prompts[:8], params(steered, 4), use_tqdm=False)
        llm.generate(long_prompts[:1], params(steered, 1), use_tqdm=False)
    predictions_before = steer_llm.collective_rpc("vllm_steer_stats")[0]["l2s_predictions"]

    def batch(name: str) -> dict:
        llm, steered = rows[name]
        return timed_batch(llm, prompts, params(steered, args.max_tokens), n * args.max_tokens, name)

    def lone(name: str) -> dict:
        llm, steered = rows[name]
        ttfts = []
        for prompt in long_prompts:
            out = llm.generate([prompt], params(steered, 1), use_tqdm=False)[0]
            ttfts.append(out.metrics.first_token_latency)
        return {"median_ttft_ms": 1000 * statistics.median(ttfts)}

    names = list(rows)
    throughput = interleaved_rounds(names, args.rounds, batch)
    latency = interleaved_rounds(names, args.rounds, lone)
    predictions = steer_llm.collective_rpc("vllm_steer_stats")[0]["l2s_predictions"] - predictions_before
    expected_predictions = args.rounds * (n + args.latency_requests)

    tps = median_of(throughput, "tokens_per_s")
    batch_ttft = median_of(throughput, "mean_ttft_ms")
    lone_ttft = median_of(latency, "median_ttft_ms")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": vars(args),
        "tokens_per_s": tps,
        "throughput_ratio_to_vanilla": {k: tps[k] / tps["vanilla"] for k in names},
        "batch_mean_ttft_ms": batch_ttft,
        "batch_ttft_ratio_to_vanilla": {k: batch_ttft[k] / batch_ttft["vanilla"] for k in names},
        "lone_median_ttft_ms": lone_ttft,
        "lone_ttft_ratio_to_vanilla": {k: lone_ttft[k] / lone_ttft["vanilla"] for k in names},
        "l2s_predictions": predictions,
        "l2s_predictions_expected": expected_predictions,
        "throughput_rounds": throughput,
        "latency_rounds": latency,
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\nL2S pack: L'={args.read_layer}, L*={args.steer_layer}, K={args.width}, alpha {args.alpha:g}; "
          f"batch: {n} requests x {args.prompt_len} prompt + {args.max_tokens} generated tokens; lone: "
          f"{args.latency_requests} requests x {args.latency_prompt_len} prompt tokens, 1 output token")
    print(f"predictor runs during the measured rounds: {predictions} (expected one per l2s request: "
          f"{expected_predictions})")
    print("\n| row | tokens/s (median) | ratio | batch mean TTFT ms | ratio | lone median TTFT ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in names:
        print(f"| {k} | {tps[k]:.1f} | {tps[k] / tps['vanilla']:.3f} | {batch_ttft[k]:.1f} | "
              f"{batch_ttft[k] / batch_ttft['vanilla']:.3f} | {lone_ttft[k]:.2f} | "
              f"{lone_ttft[k] / lone_ttft['vanilla']:.3f} |")
    print(f"({result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
