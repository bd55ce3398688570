"""Items per second of ``vllm-steer eval`` (TruthfulQA MC) with 1 vs 2 Ray actors, in one run.

The model is the tests' tiny random Llama (``cached_tiny_checkpoint``) with a random ITI pack;
``--questions`` questions of ``mc_task.json`` x 2 settings (none, ITI), ``--shards`` shards. Each row
is a fresh job folder; the time is the whole ``run_job`` wall time, actor and engine start-up
included (reported separately: the time until the first shard is saved), so it is what a user waits.

    python benchmarks/eval_scaling.py --data ../shared/data/truthfulqa/mc_task.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="TruthfulQA's mc_task.json")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--actors", default="1,2", help="actor counts to compare (comma list)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_steer.eval.job import EvalJob, Setting, run_job
    from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
    from vllm_steer.pack import save_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint
    from vllm_steer.pack.synthetic import random_pack

    work = Path(tempfile.mkdtemp(prefix="vllm-steer-eval-bench-"))
    model = cached_tiny_checkpoint("llama")
    pack = save_pack(work / "tq.safetensors", random_pack(shape_of_checkpoint(model), "tq", num_heads_selected=6,
                                                          seed=3, sigma_scale=4.0))
    job = EvalJob(model=str(model), data=args.data, packs=(str(pack),),
                  settings=(Setting(None), Setting({"pack": "tq", "method": "iti", "alpha": 6.0})),
                  num_shards=args.shards, limit=args.questions,
                  engine={"dtype": "float32", "max_model_len": 512, "enforce_eager": True})
    items = args.questions * len(job.settings)
    rows = {}
    for n in [int(a) for a in args.actors.split(",")]:
        first: list[float] = []
        t0 = time.perf_counter()
        report = run_job(job, work / f"actors{n}", num_actors=n, progress=False,
                         on_unit_done=lambda *_: first.append(time.perf_counter()))
        wall = time.perf_counter() - t0
        assert report.complete, report.failed
        rows[n] = {"wall_s": wall, "items_per_s": items / wall, "first_shard_s": first[0] - t0}
        print(f"{n} actor(s): {wall:.1f} s, {items / wall:.2f} items/s (first shard saved at "
              f"{first[0] - t0:.1f} s)", flush=True)
    same = len({(work / f"actors{n}" / "results.json").read_text() for n in rows}) == 1
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "args": vars(args), "items": items,
              "rows": rows, "identical_results": same}
    print(f"\n{args.questions} questions x {len(job.settings)} settings = {items} items, {args.shards} shards; "
          f"per-item results identical across actor counts: {same}")
    print("\n| actors | wall s | items/s | ratio to 1 actor | first shard saved at s |\n|---|---|---|---|---|")
    base = rows[min(rows)]["items_per_s"]
    for n, r in rows.items():
        print(f"| {n} | {r['wall_s']:.1f} | {r['items_per_s']:.2f} | {r['items_per_s'] / base:.2f} | "
              f"{r['first_shard_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
