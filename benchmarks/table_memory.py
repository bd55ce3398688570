"""Device memory of the steering table (and probe table) for a 70B-class shape.

Builds the real ``SteeringTable`` / ``ProbeTable`` on PyTorch's ``meta`` device (nothing is
allocated) for Llama-3-70B's shape: 80 layers, 64 heads x 128, hidden 8192, 256 max sequences,
8192 max batched tokens, at tensor-parallel sizes 1 and 8 (per rank). Rows are float32.

    .venv/bin/python benchmarks/table_memory.py
"""

from __future__ import annotations

import argparse

from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.engine.steering_table import BASE_CACHE_BYTES, RankLayout, SteeringTable


def table_bytes(layout: RankLayout, head_layers, residual_layers, probe_layers, max_seqs, max_tokens, slots):
    table = SteeringTable(layout, head_layers, residual_layers, max_num_tokens=max_tokens, max_num_reqs=max_seqs,
                          device="meta", slots_per_request=slots)
    probes = ProbeTable(layout, probe_layers, max_tokens, table.num_slots, "meta") if probe_layers else None
    return table.buffer_bytes(), probes.buffer_bytes() if probes else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args()
    n = args.layers
    every = list(range(n))
    iti_layers = list(range(n // 4, n // 2))  # an ITI pack whose 48 heads fall in 20 middle layers
    # (name, head layers, residual layers, probe layers, slots per request)
    setups = [
        ("ITI pack, heads in 20 layers", iti_layers, [], [], 1),
        ("ITI pack with probes (FASB-capable: 2 slots)", iti_layers, [], iti_layers, 2),
        ("residual pack on every layer", [], every, [], 1),
        ("live packs (every layer: heads, residual, probes; 2 slots)", every, every, every, 2),
    ]
    print(f"shape: {n} layers, {args.heads} heads x {args.head_dim}, hidden {args.hidden}; "
          f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}; float32 rows")
    print("| setup | TP | steering table MiB/rank | probe table MiB/rank | total MiB/rank |")
    print("|---|---|---|---|---|")
    for name, heads, residual, probe, slots in setups:
        for tp in (1, 8):
            layout = RankLayout(n, args.heads, args.head_dim, args.hidden, tp_rank=0, tp_size=tp)
            steer, probes = table_bytes(layout, heads, residual, probe, args.max_num_seqs,
                                        args.max_num_batched_tokens, slots)
            print(f"| {name} | {tp} | {steer / 2**20:.0f} | {probes / 2**20:.0f} | {(steer + probes) / 2**20:.0f} |")
    print(f"plus the cached unit-alpha rows: at most {BASE_CACHE_BYTES / 2**20:.0f} MiB per rank")


if __name__ == "__main__":
    main()
