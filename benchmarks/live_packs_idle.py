"""What live packs cost: an engine with every layer hooked (``steering.live_packs``, what
``vllm serve --steering-admin-key`` starts) vs vanilla vLLM, measured in one run on one model.

Same model and setup as ``throughput.py`` (random-weight Llama shape, ``load_format="dummy"``,
token-id prompts, greedy, ``ignore_eos``). Rows:

  vanilla        an engine whose processes load no plugin at all (VLLM_PLUGINS=none)
  packs_idle     the plugin with one ITI pack at start-up (its layers hooked), requests unsteered
  live_idle      live packs: every layer's head op (with probes) and residual op, requests unsteered
  live_steered   live packs, every request ITI-steered by a pack added after start-up

Throughput of ``--num-requests`` requests in one ``generate``, in interleaved rounds (round r starts
r rows later), medians reported with their ratio to vanilla.

    python benchmarks/live_packs_idle.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench_engines import (
    add_model_args, build_model, engine_kwargs, interleaved_rounds, median_of, timed_batch, token_prompts,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pack-heads", type=int, default=16, help="heads the ITI packs select")
    add_model_args(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    from vllm_steer.integration.live_packs import add_pack_to_llm
    from vllm_steer.pack import save_pack
    from vllm_steer.pack.synthetic import random_pack

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-live-bench-"))
    model, shape = build_model(args, work)
    pack = save_pack(work / "iti.safetensors", random_pack(shape, "iti", num_heads_selected=args.pack_heads, seed=0))
    live_pack = save_pack(work / "live.safetensors", random_pack(shape, "live", num_heads_selected=args.pack_heads,
                                                                 with_probes=True, seed=1))
    empty = work / "no_packs"
    empty.mkdir()
    common = engine_kwargs(args, model, args.prompt_len + args.max_tokens + 8, args.num_requests)
    packs_llm = LLM(**common, additional_config={"steering": {"packs": [str(pack)]}})
    live_llm = LLM(**common, additional_config={"steering": {"packs_dir": str(empty), "live_packs": True}})
    add_pack_to_llm(live_llm, live_pack.read_bytes())
    os.environ["VLLM_PLUGINS"] = "none"
    try:
        vanilla_llm = LLM(**common)
    finally:
        del os.environ["VLLM_PLUGINS"]

    n = args.num_requests
    prompts = token_prompts(n, args.prompt_len, args.vocab_size, seed=0)
    spec = {"pack": "live", "method": "iti", "alpha": 2.0}

    def params(steered: bool, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={"steering": spec} if steered else None)

    rows = {"vanilla": (vanilla_llm, False), "packs_idle": (packs_llm, False), "live_idle": (live_llm, False),
            "live_steered": (live_llm, True)}
    for llm, steered in rows.values():  # warm-up: compiles every shape used below
        llm.generate(prompts[:8], params(steered, 4), use_tqdm=False)

    def batch(name: str) -> dict:
        llm, steered = rows[name]
        return timed_batch(llm, prompts, params(steered, args.max_tokens), n * args.max_tokens, name)

    names = list(rows)
    throughput = interleaved_rounds(names, args.rounds, batch)
    tps = median_of(throughput, "tokens_per_s")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "args": vars(args),
        "tokens_per_s": tps,
        "throughput_ratio_to_vanilla": {k: tps[k] / tps["vanilla"] for k in names},
        "rounds": throughput,
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\n{shape.num_layers} layers; packs select {args.pack_heads} heads; {n} requests x {args.prompt_len} "
          f"prompt + {args.max_tokens} generated tokens")
    print("\n| row | tokens/s (median) | ratio to vanilla |")
    print("|---|---|---|")
    for k in names:
        print(f"| {k} | {tps[k]:.1f} | {tps[k] / tps['vanilla']:.3f} |")
    print(f"({result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
