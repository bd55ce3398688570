"""Throughput of FASB-monitored generation vs vanilla vLLM at several fire rates, prefix caching on
and off, measured in one run on one model, against the cost predicted from the recomputed tokens.

Same model and setup as ``throughput.py`` (random-weight Llama shape, ``load_format="dummy"``,
token-id prompts, greedy, ``ignore_eos``). For each prefix-caching setting (``--prefix-caching``,
vLLM's ``enable_prefix_caching``) the run builds two engines with that setting: one whose processes
load no plugin at all (VLLM_PLUGINS=none) and one with the plugin and the pack below; so 4 engines
by default. Rows, per setting:

  vanilla       the plugin-free engine, no spec
  fasb_idle     the plugin engine, every request FASB-monitored with threshold 0.0: the probes score
                every token but a check can never fire (P >= 0): the pure monitoring cost
  fire F        the plugin engine, every request FASB-monitored; a fraction F of them
                (``--fire-fractions``, spread over the batch) gets threshold 0.5, the rest 0.0.
                F = 0 is the fasb_idle workload measured again: its deviation from the prediction
                is the measurement noise of the run.

The pack is crafted: K random heads and directions, probes with weight 0 and bias logit(P) so
every token scores exactly P (default 0.3). A request with threshold 0.5 therefore fires at its
first check, i.e. when G = min(min_tokens, max_tokens) tokens are generated, drops
min(backtrack, G) tokens and regenerates them steered at alpha * (1 - P) (one backtrack at most).
A backtrack rolls the request's paged KV back in place (no preemption, no re-prefill), so it should
cost only the recomputed tokens. A firing request drops s' = min(s, G) tokens and needs s' more
decode steps than it would have; the other requests' steps are unchanged. So the n_fired firing
requests run s' extra decode steps together, after everyone else finished (all of them at batch n
when F = 100 %). Charging exactly those:

  predicted seconds = fasb_idle seconds + s' x decode step(n_fired)
  predicted ratio to vanilla = fasb_idle ratio x fasb_idle seconds / predicted seconds

decode step(b) is measured in the same run, on the plugin engine with the fasb_idle spec, by two
calibration rows per batch size b (b = n_fired of each fire row): ``step b`` (b of the prompts,
max_tokens tokens each) and ``prefill b`` (the same b prompts, 1 token each):
decode step(b) = (seconds(step b) - seconds(prefill b)) / (max_tokens - 1). For b = n, ``step n``
is the fasb_idle row itself. s' x n_fired is checked against the engine's own counter of
recomputed tokens (``recomputed_tokens``). Each fire row prints measured ratio, predicted ratio and
(measured - predicted) / predicted in percent, and whether |that| <= ``--goal-pct`` (3 %, the
issue's goal); F = 0 is the fasb_idle workload measured again, so its deviation is this run's noise.

The run also prints the cruder prediction of issue 17's first run, for comparison: fasb_idle ratio x
delivered / (delivered + recomputed), which charges a recomputed token as much as an average
delivered token. That average carries the prompt's prefill (which a backtrack does not repeat) and
ignores that the extra steps run at a smaller batch, so it overstates the cost at F = 100 % and
understates it at small F, where the fixed cost of a decode step is shared by few requests.

Per row, the run also reads from the engines (deltas over the measured run): the scheduler's
backtracks in place and by preemption, KV blocks copied by rollbacks, recomputed tokens (the
plugin engine's ``vllm_steer_engine_stats`` utility), and ``vllm:num_preemptions`` (each engine's
own Prometheus counter), so a reader sees that no preemption happened. Checks, against the
fasb_idle outputs of the same engine (unsteered tokens): non-firing requests are untouched, firing
requests keep exactly their first G - s tokens, and fired ones regenerate different tokens.

KV cache: ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB, per engine) defaults to twice what all requests
need at once, at least 1 GiB (1 GiB at the defaults), so nothing is preempted for room and 4 engines
fit a 24 GiB machine. Block size: ``--block-size`` 32 (the CPU attention kernel's unit; vLLM's CPU
default 128 would never fill a block of this 64-token workload, making prefix caching on the same
as off). At the defaults the fire position (prompt + G - s = 40) lies in a partly filled block, so
rollbacks keep it and copy nothing; e.g. ``--max-tokens 48 --min-tokens 40 --backtrack 24``
(steer from position 48, its block 32..63 full and cached at the fire) makes them copy it with caching on.

Rounds are interleaved, and each round starts one row later than the previous one, so drifts of
the shared machine hit every row alike; medians over rounds are reported.

Default run (5 rounds x 22 runs, 4 engines): about 13 minutes on an idle 2-core CPU.

    python benchmarks/fasb_throughput.py --json /tmp/fasb_tp.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench_engines import (
    add_model_args, build_model, engine_kwargs, interleaved_rounds, median_of, steering_and_vanilla_engines,
    token_prompts,
)

COUNTERS = ("backtracks", "backtracks_in_place", "backtracks_by_preemption", "kv_copies", "recomputed_tokens")


def crafted_pack(shape, name: str, k: int, p: float, seed: int = 0):
    """A pack with K random ITI heads whose probes score every token at exactly ``p``."""
    from vllm_steer.pack.synthetic import random_pack, with_constant_probes

    return with_constant_probes(random_pack(shape, name, num_heads_selected=k, with_probes=True, seed=seed), p)


def fires(i: int, fraction: float) -> bool:
    """Whether request ``i`` gets the firing threshold: spreads round(fraction * n) over the batch."""
    return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def steering_counters(llm) -> dict:
    """The plugin engine's scheduler counters (empty for a plugin-free engine)."""
    from vllm_steer.integration.engine_stats import ENGINE_STATS_UTILITY

    return llm.llm_engine.engine_core.call_utility(ENGINE_STATS_UTILITY)


def preemptions(llm) -> float:
    """This engine's own ``vllm:num_preemptions`` counter. Read from its Prometheus stat logger, not
    from ``llm.get_metrics()``: the Prometheus registry is process-wide and holds only the metrics of
    the last engine built in this process."""
    manager = llm.llm_engine.logger_manager
    for stat_logger in manager.stat_loggers if manager is not None else ():
        per_engine = getattr(stat_logger, "counter_num_preempted_reqs", None)
        if per_engine:
            return float(sum(child._value.get() for child in per_engine.values()))
    raise RuntimeError("no vllm:num_preemptions counter on this engine (disable_log_stats must be False)")


def parse_fractions(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("fire fractions must be in [0, 1], comma-separated")
    return values


def parse_caching(text: str) -> list[bool]:
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    if not names or any(x not in ("on", "off") for x in names):
        raise argparse.ArgumentTypeError("--prefix-caching takes on, off or on,off")
    return [x == "on" for x in dict.fromkeys(names)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    add_model_args(parser)
    parser.add_argument("--block-size", type=int, default=32, help="KV block size (CPU: a multiple of 32)")
    parser.add_argument("--selected-heads", type=int, default=16, help="K: probed and steered heads")
    parser.add_argument("--constant-p", type=float, default=0.3, help="the crafted probes' P(desired)")
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--backtrack", type=int, default=8, help="s: tokens dropped when a check fires")
    parser.add_argument("--min-tokens", type=int, default=16, help="first check at this many tokens")
    parser.add_argument("--fire-fractions", type=parse_fractions, default=parse_fractions("0,0.0625,0.25,1"),
                        help="comma-separated shares of requests given threshold 0.5 (they all fire); "
                             "default 0,0.0625,0.25,1")
    parser.add_argument("--prefix-caching", type=parse_caching, default=parse_caching("on,off"),
                        help="on, off or on,off (default): one vanilla + one plugin engine per setting")
    parser.add_argument("--goal-pct", type=float, default=3.0,
                        help="a fire row meets the goal when |measured - predicted| / predicted <= this")
    parser.add_argument("--json", help="also write all rows and rounds here")
    args = parser.parse_args()
    if not args.constant_p < 0.5:
        parser.error("--constant-p must be below the firing threshold 0.5")

    n = args.num_requests
    max_model_len = args.prompt_len + args.max_tokens + 8
    head_dim = args.hidden_size // args.heads
    dtype_bytes = 2 if args.dtype in ("float16", "bfloat16", "half") else 4
    kv_need = n * max_model_len * 2 * args.layers * args.kv_heads * head_dim * dtype_bytes
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(2 * kv_need / 2**30))))
    from vllm import SamplingParams

    from vllm_steer.pack import save_pack

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-fasb-bench-"))
    model, shape = build_model(args, work)
    pack = save_pack(work / "fasb.safetensors", crafted_pack(shape, "fasb", args.selected_heads, args.constant_p))
    prompts = token_prompts(n, args.prompt_len, args.vocab_size, seed=0)

    engines: dict[str, tuple] = {}  # "on"/"off" -> (plugin engine, vanilla engine)
    startup: dict[str, float] = {}
    for caching in args.prefix_caching:
        pc = "on" if caching else "off"
        t0 = time.perf_counter()
        common = engine_kwargs(args, model, max_model_len, n, disable_log_stats=False,
                               enable_prefix_caching=caching, block_size=args.block_size)
        engines[pc] = steering_and_vanilla_engines(common, [pack])
        startup[pc] = time.perf_counter() - t0
        print(f"prefix caching {pc}: 2 engines built in {startup[pc]:.0f} s", flush=True)

    def params(spec=None, max_tokens=args.max_tokens):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if spec else None)

    def fasb(threshold: float) -> dict:
        return {"pack": "fasb", "method": "fasb", "alpha": args.alpha, "threshold": threshold,
                "backtrack": args.backtrack, "min_tokens": args.min_tokens, "max_backtracks": 1}

    firing = {f: [fires(i, f) for i in range(n)] for f in args.fire_fractions}

    def fire_row(f: float) -> str:
        return f"fire {100 * f:g}%"

    # Calibration batch sizes: the firing requests' count of each fire row (n: fasb_idle is "step n").
    calib_sizes = sorted({sum(firing[f]) for f in args.fire_fractions if sum(firing[f])})
    rows: dict[str, tuple] = {}  # name -> (prefix caching, kind, fraction, engine, prompts, params)
    for pc, (steer_llm, vanilla_llm) in engines.items():
        rows[f"{pc}/vanilla"] = (pc, "vanilla", None, vanilla_llm, prompts, [params()] * n)
        rows[f"{pc}/fasb_idle"] = (pc, "fasb_idle", None, steer_llm, prompts, [params(fasb(0.0))] * n)
        for f in args.fire_fractions:
            rows[f"{pc}/{fire_row(f)}"] = (pc, "fire", f, steer_llm, prompts,
                                          [params(fasb(0.5 if x else 0.0)) for x in firing[f]])
        for b in calib_sizes:
            if b != n:
                rows[f"{pc}/step {b}"] = (pc, "calibration", None, steer_llm, prompts[:b], [params(fasb(0.0))] * b)
            rows[f"{pc}/prefill {b}"] = (pc, "calibration", None, steer_llm, prompts[:b],
                                        [params(fasb(0.0), max_tokens=1)] * b)

    t_warm = time.perf_counter()
    for pc, (steer_llm, vanilla_llm) in engines.items():  # the whole batch once: fills prefix caches alike
        for llm in (steer_llm, vanilla_llm):
            llm.generate(prompts, [params()] * n, use_tqdm=False)
    for _, _, _, llm, row_prompts, p in rows.values():  # compiles, and exercises a backtrack
        llm.generate(row_prompts[:8], p[:8], use_tqdm=False)
    warm_s = time.perf_counter() - t_warm
    print(f"warm-up {warm_s:.0f} s", flush=True)

    last_tokens: dict[str, list[list[int]]] = {}

    def run(name: str) -> dict:
        pc, kind, _, llm, row_prompts, p = rows[name]
        plugin = kind != "vanilla"
        before = steering_counters(llm) if plugin else {}
        pre0 = preemptions(llm)
        t0 = time.perf_counter()
        outs = llm.generate(row_prompts, p, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        expected = sum(x.max_tokens for x in p)
        assert tokens == expected, f"{name}: {tokens} tokens delivered, expected {expected}"
        last_tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
        measured = {"tokens_per_s": tokens / elapsed, "seconds": elapsed,
                    "preemptions": preemptions(llm) - pre0}
        if plugin:
            after = steering_counters(llm)
            measured.update({k: after[k] - before[k] for k in COUNTERS})
            measured["max_tokens_scheduled_after_backtrack"] = after["max_tokens_scheduled_after_backtrack"]
        return measured

    measured = interleaved_rounds(list(rows), args.rounds, run)
    med = median_of(measured, "tokens_per_s")
    sec = median_of(measured, "seconds")

    def decode_step_seconds(pc: str, b: int) -> float:
        """Seconds of one decode step at batch b (fasb_idle spec, plugin engine), from calibration rows."""
        full = sec[f"{pc}/fasb_idle"] if b == n else sec[f"{pc}/step {b}"]
        return (full - sec[f"{pc}/prefill {b}"]) / (args.max_tokens - 1)

    # What the spec implies (constant probes): every firing request fires once, at G_fire.
    g_fire = min(args.min_tokens, args.max_tokens)
    per_fire = min(args.backtrack, g_fire)
    keep = g_fire - per_fire
    delivered = n * args.max_tokens

    table = []
    for name, (pc, kind, f, _, _, _) in rows.items():
        if kind == "calibration":
            continue
        runs = measured[name]
        ratio = med[name] / med[f"{pc}/vanilla"]
        idle_ratio = med[f"{pc}/fasb_idle"] / med[f"{pc}/vanilla"]
        row = {
            "prefix_caching": pc, "row": name.split("/", 1)[1], "fire_fraction": f,
            "tokens_per_s": med[name], "ratio_to_vanilla": ratio,
            "all_rounds_tokens_per_s": [m["tokens_per_s"] for m in runs],
            "preemptions": sum(m["preemptions"] for m in runs),
        }
        if kind != "vanilla":
            for k in COUNTERS:
                row[k] = sum(m[k] for m in runs)  # over all rounds
            row["max_tokens_scheduled_after_backtrack"] = max(m["max_tokens_scheduled_after_backtrack"] for m in runs)
        if kind == "fire":
            n_fired = sum(firing[f])
            recomputed = [m["recomputed_tokens"] for m in runs]  # per round, from the engine
            recomputed_spec = n_fired * per_fire
            crude = idle_ratio * delivered / (delivered + statistics.median(recomputed))
            step_s = decode_step_seconds(pc, n_fired) if n_fired else 0.0
            extra_steps = statistics.median(recomputed) / n_fired if n_fired else 0.0
            idle_s = sec[f"{pc}/fasb_idle"]
            predicted_s = idle_s + extra_steps * step_s
            predicted = idle_ratio * idle_s / predicted_s
            diff_pct = 100.0 * (ratio - predicted) / predicted
            idle, trig = last_tokens[f"{pc}/fasb_idle"], last_tokens[name]
            row.update({
                "fired_requests": n_fired,
                "recomputed_tokens_per_run": statistics.median(recomputed),
                "recomputed_tokens_per_run_from_spec": recomputed_spec,
                "recomputed_matches_spec": all(r == recomputed_spec for r in recomputed),
                "backtracks_match_fired": all(m["backtracks"] == n_fired for m in runs),
                "recomputed_fraction": statistics.median(recomputed) / delivered,
                "fasb_idle_ratio": idle_ratio,
                "fasb_idle_seconds": idle_s,
                "extra_decode_steps": extra_steps,
                "decode_step_seconds_at_fired_batch": step_s,
                "predicted_seconds": predicted_s,
                "predicted_ratio": predicted,
                "crude_predicted_ratio": crude,
                "crude_diff_pct": 100.0 * (ratio - crude) / crude,
                "measured_minus_predicted_pct": diff_pct,
                "meets_goal": abs(diff_pct) <= args.goal_pct,
                "non_firing_requests_untouched": all(idle[i] == trig[i] for i in range(n) if not firing[f][i]),
                "firing_requests_keep_prefix": all(idle[i][:keep] == trig[i][:keep] for i in range(n) if firing[f][i]),
                "firing_requests_regenerated_differently": sum(
                    idle[i][keep:] != trig[i][keep:] for i in range(n) if firing[f][i]),
                "no_preemption": row["preemptions"] == 0 and row["backtracks_by_preemption"] == 0,
            })
        table.append(row)

    pcs = list(engines)
    same_idle = {pc: last_tokens[f"{pc}/vanilla"] == last_tokens[f"{pc}/fasb_idle"] for pc in pcs}
    same_across = (last_tokens[f"{pcs[0]}/fasb_idle"] == last_tokens[f"{pcs[-1]}/fasb_idle"]) if len(pcs) > 1 else None
    fire_rows = [r for r in table if r["fire_fraction"] is not None]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": {k: v for k, v in vars(args).items()},
        "kv_cache_gib_per_engine": int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        "formula": "predicted seconds = fasb_idle seconds + (recomputed / n_fired) * decode step(n_fired), "
                   "decode step(b) = (seconds(step b) - seconds(prefill b)) / (max_tokens - 1); "
                   "predicted = fasb_idle ratio * fasb_idle seconds / predicted seconds; "
                   "diff_pct = 100 * (measured - predicted) / predicted; crude = fasb_idle ratio * delivered / "
                   "(delivered + recomputed)",
        "decode_step_seconds": {pc: {b: decode_step_seconds(pc, b) for b in calib_sizes} for pc in engines},
        "delivered_tokens_per_run": delivered,
        "g_at_fire": g_fire, "kept_tokens_at_fire": keep, "recomputed_tokens_per_fire": per_fire,
        "rows": table,
        "vanilla_tokens_equal_fasb_idle_tokens": same_idle,
        "fasb_idle_tokens_equal_across_prefix_caching": same_across,
        "all_fire_rows_meet_goal": all(r["meets_goal"] for r in fire_rows),
        "all_checks_pass": all(r["non_firing_requests_untouched"] and r["firing_requests_keep_prefix"]
                               and r["recomputed_matches_spec"] and r["backtracks_match_fired"]
                               and r["no_preemption"] for r in fire_rows),
        "engine_startup_seconds": startup, "warmup_seconds": warm_s,
        "seconds": time.perf_counter() - t_start,
    }

    print(f"\nFASB: alpha {args.alpha:g}, backtrack s={args.backtrack}, min_tokens {args.min_tokens}, "
          f"K={args.selected_heads} constant-P probes (P={args.constant_p:g}); {n} requests x {args.prompt_len} "
          f"prompt + {args.max_tokens} generated tokens, greedy; block size {args.block_size}; KV cache "
          f"{result['kv_cache_gib_per_engine']} GiB per engine; {args.rounds} interleaved rounds, medians")
    print(f"a firing request fires at G={g_fire}, keeps {keep} and regenerates {per_fire} tokens; "
          f"delivered {delivered} tokens per run")
    print("predicted ratio = fasb_idle ratio x fasb_idle s / (fasb_idle s + recomputed / n_fired x decode step at "
          "batch n_fired), recomputed from the engine's counter; diff = (measured - predicted) / predicted; goal "
          f"|diff| <= {args.goal_pct:g} %; crude = fasb_idle ratio x delivered / (delivered + recomputed)")
    print("\ndecode step seconds at batch b (plugin engine, fasb_idle spec, (step b - prefill b) / "
          f"{args.max_tokens - 1}): " + "; ".join(
              f"caching {pc}: " + ", ".join(f"b={b} {1000 * v:.2f} ms" for b, v in steps.items())
              for pc, steps in result["decode_step_seconds"].items()))
    print("\n| prefix cache | row | fired | tok/s (median) | measured ratio | recomputed / delivered "
          "| predicted ratio | diff | within goal | crude prediction (diff) | backtracks in place / by preemption "
          "| kv copies | vllm:num_preemptions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        fire = r["fire_fraction"] is not None
        counters = (f"{r['backtracks_in_place']} / {r['backtracks_by_preemption']}" if "backtracks" in r else "-")
        print(f"| {r['prefix_caching']} | {r['row']} | {r.get('fired_requests', '-')} | {r['tokens_per_s']:.1f} "
              f"| {r['ratio_to_vanilla']:.3f} "
              f"| {(str(r['recomputed_tokens_per_run']) + ' / ' + str(delivered)) if fire else '-'} "
              f"| {format(r['predicted_ratio'], '.3f') if fire else '-'} "
              f"| {format(r['measured_minus_predicted_pct'], '+.1f') + ' %' if fire else '-'} "
              f"| {('yes' if r['meets_goal'] else 'NO') if fire else '-'} "
              f"| {(format(r['crude_predicted_ratio'], '.3f') + ' (' + format(r['crude_diff_pct'], '+.1f') + ' %)') if fire else '-'} "
              f"| {counters} "
              f"| {r.get('kv_copies', '-')} | {r['preemptions']:.0f} |")
    print("(counters and preemptions: summed over all rounds of the row)")
    print("\nchecks vs the unsteered tokens (fasb_idle, same engine):")
    for r in fire_rows:
        print(f"  {r['prefix_caching']}/{r['row']}: non-firing identical {r['non_firing_requests_untouched']}; "
              f"firing keep their first {keep} tokens {r['firing_requests_keep_prefix']}; regenerated "
              f"differently {r['firing_requests_regenerated_differently']}/{r['fired_requests']}; backtracks = "
              f"fired {r['backtracks_match_fired']}; recomputed = spec ({r['recomputed_tokens_per_run_from_spec']}) "
              f"{r['recomputed_matches_spec']}; no preemption {r['no_preemption']}; max tokens scheduled in the "
              f"step after a backtrack {r['max_tokens_scheduled_after_backtrack']}")
    print(f"  vanilla tokens == fasb_idle tokens: {same_idle}; fasb_idle tokens equal across prefix-caching "
          f"settings: {same_across}")
    print(f"\nall fire rows within {args.goal_pct:g} % of the prediction: {result['all_fire_rows_meet_goal']}; "
          f"all checks pass: {result['all_checks_pass']}")
    print("\nper round (tok/s): " + "; ".join(
        f"{r['prefix_caching']}/{r['row']} " + " / ".join(f"{x:.1f}" for x in r["all_rounds_tokens_per_s"])
        for r in table))
    print("calibration rows per round (s): " + "; ".join(
        f"{name} " + " / ".join(f"{m['seconds']:.3f}" for m in measured[name])
        for name, row in rows.items() if row[1] == "calibration"))
    print(f"(engines {sum(startup.values()):.0f} s, warm-up {warm_s:.0f} s, {result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
