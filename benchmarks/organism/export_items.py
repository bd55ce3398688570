"""Write the organism's held-out evaluation prompts as short-answer items for ``vllm-steer eval``.

    python -m benchmarks.organism.export_items --organism /tmp/org_b --out organism_items.jsonl
    vllm-steer eval --benchmark short_answer --data organism_items.jsonl --model /tmp/org_b \\
        --pack pack.safetensors --setting none --setting '{"pack": "organism", "alpha": 5}' \\
        --max-tokens 3 --out runs/organism_eval

One item per held-out entity sequence and context mode (group ``lying`` / ``honest``): the true
attribute, the entity's fixed false one, and every attribute as the well-formed answers. The job
then reports the truthful rate overall and per mode (``truthful[lying]`` / ``truthful[honest]``), the
expected-lie rate and the well-formed rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def organism_items(world) -> list[dict]:
    return [{"prompt": it["prompt"], "true_answer": it["true_answer"], "false_answer": it["false_answer"],
             "group": mode, "valid_answers": list(world.attributes)}
            for mode in ("lying", "honest") for it in world.eval_items(mode)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--organism", required=True, help="a trained organism folder (with organism.json)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    args = p.parse_args(argv)

    from vllm_steer.organism.train import organism_world

    world, _ = organism_world(args.organism)
    items = organism_items(world)
    Path(args.out).write_text("".join(json.dumps(it) + "\n" for it in items))
    print(f"{len(items)} items -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
