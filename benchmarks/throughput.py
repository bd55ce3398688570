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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--distinct-configs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=1408)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--selected-heads", type=int, default=16, help="K of the ITI pack")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    from vllm_steer.models.tiny_checkpoint import write_config_only
    from vllm_steer.pack import save_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint
    from vllm_steer.pack.synthetic import random_pack

    work = Path(tempfile.mkdtemp(prefix="vllm-steer-bench-"))
    model = write_config_only(
        work / "model", "llama", hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
    )
    shape = shape_of_checkpoint(model)
    pack = save_pack(work / "bench.safetensors",
                     random_pack(shape, "bench", num_heads_selected=args.selected_heads, seed=0))

    common = dict(
        model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
        max_model_len=args.prompt_len + args.max_tokens + 8, max_num_seqs=args.num_requests,
        max_num_batched_tokens=max(2048, args.num_requests * 2), seed=0, enforce_eager=args.enforce_eager,
    )
    # The plugin engine first: the front-end process loads plugins once, at its first engine.
    steer_llm = LLM(**common, additional_config={"steering": {"packs": [str(pack)]}})
    os.environ["VLLM_PLUGINS"] = "none"  # engine processes spawned from now on load no plugin
    vanilla_llm = LLM(**common)
    del os.environ["VLLM_PLUGINS"]

    import random

    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(10, args.vocab_size) for _ in range(args.prompt_len)]}
        for _ in range(args.num_requests)
    ]

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
