"""Throughput of steered generation vs vanilla vLLM, measured in one run on one model.

Rows (same prompts, same lengths, greedy, ``ignore_eos``):
  vanilla   an engine whose processes load no plugin at all (VLLM_PLUGINS=none)
  idle      the plugin on, packs loaded and hooked, no request steered
  steered   the plugin on, every request steered with its own config (distinct alphas)

Rounds are interleaved (vanilla, idle, steered, vanilla, ...) so drifts of the machine hit every
row alike; the median over rounds is reported with the ratios to vanilla.

    python benchmarks/throughput.py --num-requests 256 --distinct-configs 256
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

from bench_engines import add_model_args, build_model, engine_kwargs, steering_and_vanilla_engines, token_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--distinct-configs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_model_args(parser)
    parser.add_argument("--selected-heads", type=int, default=16, help="K of the ITI pack")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import SamplingParams

    from vllm_steer.pack import save_pack
    from vllm_steer.pack.synthetic import random_pack

    work = Path(tempfile.mkdtemp(prefix="vllm-steer-bench-"))
    model, shape = build_model(args, work)
    pack = save_pack(work / "bench.safetensors",
                     random_pack(shape, "bench", num_heads_selected=args.selected_heads, seed=0))
    common = engine_kwargs(args, model, args.prompt_len + args.max_tokens + 8, args.num_requests)
    steer_llm, vanilla_llm = steering_and_vanilla_engines(common, [pack])
    prompts = token_prompts(args.num_requests, args.prompt_len, args.vocab_size, seed=0)

    def params(spec=None):
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if spec else None)

    plain = [params()] * args.num_requests
    steered = [
        params({"pack": "bench", "method": "iti", "alpha": 0.5 + (i % args.distinct_configs) / args.distinct_configs})
        for i in range(args.num_requests)
    ]
    rows = {"vanilla": (vanilla_llm, plain), "idle": (steer_llm, plain), "steered": (steer_llm, steered)}

    for llm, p in rows.values():  # warm-up
        llm.generate(prompts[: min(8, len(prompts))], p[:8], use_tqdm=False)

    rates: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(args.rounds):
        for name, (llm, p) in rows.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, p, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == args.num_requests * args.max_tokens
            rates[name].append(tokens / elapsed)
            print(f"round {r} {name:8s} {tokens / elapsed:10.1f} tok/s", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": vars(args),
        "tokens_per_s": med,
        "ratio_idle": med["idle"] / med["vanilla"],
        "ratio_steered": med["steered"] / med["vanilla"],
        "all_rounds": rates,
    }
    print("\n| row | tokens/s (median) | ratio to vanilla |\n|---|---|---|")
    for k in rows:
        print(f"| {k} | {med[k]:.1f} | {med[k] / med['vanilla']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
