"""Throughput of FASB-monitored generation vs vanilla vLLM, measured in one run on one model.

Same model and setup as ``throughput.py`` (random-weight Llama shape, ``load_format="dummy"``,
token-id prompts, greedy, ``ignore_eos``). Rows:

  vanilla       an engine whose processes load no plugin at all (VLLM_PLUGINS=none)
  plugin_idle   the plugin on (pack loaded, probes hooked), requests without a steering spec: the
                plugin's own cost, to tell it apart from the monitoring cost below
  fasb_idle     the plugin on, every request FASB-monitored with threshold 0.0: the probes score
                every token but a check can never fire (P >= 0), so this is the pure monitoring cost
  fasb_trigger  the plugin on, every request FASB-monitored; a chosen fraction of them
                (``--fire-fraction``) gets threshold 0.5, the rest 0.0

The pack is crafted: K random heads and directions, probes with weight 0 and bias logit(P) so
every token scores exactly P (default 0.3). A request with threshold 0.5 therefore fires at its
first check, i.e. when G = min(min_tokens, max_tokens) tokens are generated, drops
min(backtrack, G) tokens and regenerates them steered at alpha * (1 - P) (one backtrack at most).

Tokens/s counts delivered tokens only (the tokens the client receives: num_requests x max_tokens);
the regenerated tokens are work on top. Their share is computed from the FASB spec, not measured:
recomputed = n_fired * min(backtrack, G_fire), fraction = recomputed / delivered. The run also
checks, against the fasb_idle outputs (the same engine, unsteered tokens), that non-firing requests
are untouched and that firing requests keep exactly their first G_fire - backtrack tokens.

Rounds are interleaved, and each round starts one row later than the previous one (round 0: vanilla,
plugin_idle, fasb_idle, fasb_trigger; round 1: plugin_idle, ..., vanilla; ...), so drifts of the
shared machine hit every row alike; medians over rounds are reported.

    python benchmarks/fasb_throughput.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

from bench_engines import (
    add_model_args, build_model, engine_kwargs, interleaved_rounds, median_of, steering_and_vanilla_engines,
    token_prompts,
)


def crafted_pack(shape, name: str, k: int, p: float, seed: int = 0):
    """A pack with K random ITI heads whose probes score every token at exactly ``p``."""
    from vllm_steer.pack.synthetic import random_pack, with_constant_probes

    return with_constant_probes(random_pack(shape, name, num_heads_selected=k, with_probes=True, seed=seed), p)


def fires(i: int, fraction: float) -> bool:
    """Whether request ``i`` gets the firing threshold: spreads round(fraction * n) over the batch."""
    return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    add_model_args(parser)
    parser.add_argument("--selected-heads", type=int, default=16, help="K: probed and steered heads")
    parser.add_argument("--constant-p", type=float, default=0.3, help="the crafted probes' P(desired)")
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--backtrack", type=int, default=8, help="s: tokens dropped when a check fires")
    parser.add_argument("--min-tokens", type=int, default=16, help="first check at this many tokens")
    parser.add_argument("--fire-fraction", type=float, default=0.25,
                        help="share of fasb_trigger requests given threshold 0.5 (they all fire)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not 0.0 <= args.fire_fraction <= 1.0:
        parser.error("--fire-fraction must be in [0, 1]")
    if not args.constant_p < 0.5:
        parser.error("--constant-p must be below the firing threshold 0.5")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import SamplingParams

    from vllm_steer.pack import save_pack

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-fasb-bench-"))
    model, shape = build_model(args, work)
    pack = save_pack(work / "fasb.safetensors", crafted_pack(shape, "fasb", args.selected_heads, args.constant_p))
    common = engine_kwargs(args, model, args.prompt_len + args.max_tokens + 8, args.num_requests)
    steer_llm, vanilla_llm = steering_and_vanilla_engines(common, [pack])
    n = args.num_requests
    prompts = token_prompts(n, args.prompt_len, args.vocab_size, seed=0)

    def params(spec=None):
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if spec else None)

    def fasb(threshold: float) -> dict:
        return {"pack": "fasb", "method": "fasb", "alpha": args.alpha, "threshold": threshold,
                "backtrack": args.backtrack, "min_tokens": args.min_tokens, "max_backtracks": 1}

    firing = [fires(i, args.fire_fraction) for i in range(n)]
    rows = {
        "vanilla": (vanilla_llm, [params()] * n),
        "plugin_idle": (steer_llm, [params()] * n),
        "fasb_idle": (steer_llm, [params(fasb(0.0))] * n),
        "fasb_trigger": (steer_llm, [params(fasb(0.5 if f else 0.0)) for f in firing]),
    }

    for llm, p in rows.values():  # warm-up (compiles, and exercises a backtrack once)
        llm.generate(prompts[:8], p[:8], use_tqdm=False)

    last_tokens: dict[str, list[list[int]]] = {}

    def run(name: str) -> dict:
        llm, p = rows[name]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert tokens == n * args.max_tokens, f"{name}: {tokens} tokens delivered"
        last_tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
        return {"tokens_per_s": tokens / elapsed, "seconds": elapsed}

    measured = interleaved_rounds(list(rows), args.rounds, run)
    rates = {k: [m["tokens_per_s"] for m in v] for k, v in measured.items()}

    # What the spec implies (constant probes): every firing request fires once, at G_fire.
    g_fire = min(args.min_tokens, args.max_tokens)
    per_fire = min(args.backtrack, g_fire)
    keep = g_fire - per_fire
    n_fired = sum(firing)
    delivered = n * args.max_tokens
    recomputed = n_fired * per_fire

    # Checks against the unsteered tokens (fasb_idle's, same engine).
    idle, trig = last_tokens["fasb_idle"], last_tokens["fasb_trigger"]
    untouched_ok = all(idle[i] == trig[i] for i in range(n) if not firing[i])
    prefix_ok = all(idle[i][:keep] == trig[i][:keep] for i in range(n) if firing[i])
    diverged = sum(idle[i][keep:] != trig[i][keep:] for i in range(n) if firing[i])

    med = median_of(measured, "tokens_per_s")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": vars(args),
        "tokens_per_s": med,
        "ratio_to_vanilla": {k: med[k] / med["vanilla"] for k in rows},
        "fired_requests": n_fired,
        "g_at_fire": g_fire,
        "recomputed_tokens_per_fire": per_fire,
        "recomputed_tokens": recomputed,
        "delivered_tokens": delivered,
        "recomputed_fraction": recomputed / delivered,
        "non_firing_requests_untouched": untouched_ok,
        "firing_requests_keep_prefix": prefix_ok,
        "firing_requests_diverging_after_prefix": diverged,
        "all_rounds": rates,
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\nFASB: alpha {args.alpha:g}, backtrack s={args.backtrack}, min_tokens {args.min_tokens}, K={args.selected_heads}"
          f" constant-P probes (P={args.constant_p:g}); {n} requests x {args.prompt_len} prompt + {args.max_tokens}"
          f" generated tokens, greedy")
    print(f"fasb_trigger: {n_fired}/{n} requests fire (threshold 0.5), each at G={g_fire}, keeping {keep} and "
          f"regenerating {per_fire} tokens -> recomputed {recomputed} / delivered {delivered} = "
          f"{recomputed / delivered:.4f} (from the spec: n_fired * min(s, G_fire) / (n * max_tokens))")
    print(f"checks vs unsteered tokens: non-firing requests identical: {untouched_ok}; firing requests keep "
          f"their first {keep} tokens: {prefix_ok}; firing requests whose regenerated tokens differ: "
          f"{diverged}/{n_fired}")
    print("\n| row | delivered tokens/s (median) | ratio to vanilla |\n|---|---|---|")
    for k in rows:
        print(f"| {k} | {med[k]:.1f} | {med[k] / med['vanilla']:.3f} |")
    print("\nper round: " + "; ".join(f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in rates.items()))
    print(f"({result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
