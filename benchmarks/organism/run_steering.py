"""One command: train (or reuse) the organism, fit a steer pack on it through vLLM, and measure
steering with vllm-steer on held-out prompts.

    python -m benchmarks.organism.run_steering --out runs/organism

Steps: (1) ``cached_organism`` trains the model when missing; (2) contrastive pairs from the world
(both modes, disjoint from the evaluation prompts) go through ``vllm-steer``'s fit pipeline (capture
through vLLM, per-head probes, top-K heads, mass-mean directions, sigma, residual vectors); (3) one
vLLM engine with the pack answers the held-out lying-context and honest-context prompts unsteered,
with ITI at several alphas and with residual steering at several alphas, all in one batch.
Reported per setting: truthful rate, lie rate, well-formed rate (the damage proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/organism", help="work folder: pairs, pack, heatmap, results")
    p.add_argument("--cache-root", help="organism cache (default ~/.cache/vllm-steer/models)")
    p.add_argument("--organism", help="use this trained organism folder instead of the cached default")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--num-pairs", type=int, default=800)
    p.add_argument("--contrast", choices=["modes", "answers"], default="modes",
                   help="modes: honest- vs lying-context prompts, read at the answer cue 'A:' (where the "
                        "model must use the mode); answers: true vs false answer completions, read at the "
                        "answer token")
    p.add_argument("-k", "--num-heads", type=int, default=8)
    p.add_argument("--position", choices=["last", "mean"], default="last")
    p.add_argument("--iti-alphas", default="2,5,10,20")
    p.add_argument("--residual-alphas", default="1,2,4")
    p.add_argument("--residual-layers", default="all")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from vllm_steer.organism.evaluate import answer_of, score_answers
    from vllm_steer.organism.train import cached_organism, organism_world
    from vllm_steer.organism.world import WorldConfig, contrastive_pairs
    from vllm_steer.fit.pipeline import FitOptions, fit_steer_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.organism) if args.organism else cached_organism(
        args.cache_root, world_config=WorldConfig(seed=args.world_seed), seed=args.train_seed,
        steps=args.train_steps, loss_on="answers")
    world, record = organism_world(model)
    print(f"organism: {model} (trained in {record['training'].get('seconds', float('nan')):.0f} s)")

    pairs = out / f"{args.contrast}.jsonl"
    if args.contrast == "answers":
        rows = contrastive_pairs(world, args.num_pairs, seed=1)
    else:  # one labelled row per context: label 1 = honest context, read at its last token ("A:")
        rows = [{"prompt": r["prompt"], "completion": "", "label": int(r["mode"] == "honest"), "group": str(i)}
                for i, r in enumerate(contrastive_pairs(world, args.num_pairs, seed=1, include_mode=True))]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    residual_layers = args.residual_layers if args.residual_layers in ("all", "none") else [
        int(x) for x in args.residual_layers.split(",")]
    report = fit_steer_pack(
        str(model), pairs, out / "organism.safetensors",
        FitOptions(name="organism", num_heads=args.num_heads, position=args.position,
                   residual_layers=residual_layers, max_model_len=256, progress=False),
    )
    print(f"fit: {len(report.selected_heads)} heads {report.selected_heads}; best val accuracy by position "
          f"{report.best_val_accuracy}; selected {['%.3f' % a for a in report.selected_val_accuracy]}")

    settings = [("none", None)]
    settings += [(f"ITI alpha={a:g}", {"pack": "organism", "method": "iti", "alpha": a})
                 for a in _parse_floats(args.iti_alphas)]
    settings += [(f"residual alpha={a:g}", {"pack": "organism", "method": "residual", "alpha": a})
                 for a in _parse_floats(args.residual_alphas)]
    items = {mode: world.eval_items(mode) for mode in ("lying", "honest")}

    llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=256, seed=0,
              additional_config={"steering": {"packs": [str(report.pack_path)]}})
    prompts, params, index = [], [], []
    for s, (_, spec) in enumerate(settings):
        for mode, mode_items in items.items():
            for it in mode_items:
                prompts.append(it["prompt"])
                params.append(SamplingParams(temperature=0.0, max_tokens=3,
                                             extra_args={"steering": spec} if spec else None))
                index.append((s, mode))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    answers: dict[tuple[int, str], list] = {}
    for (s, mode), o in zip(index, outputs):
        answers.setdefault((s, mode), []).append(answer_of(o.outputs[0].text))

    rows = []
    for s, (label, _) in enumerate(settings):
        row = {"setting": label}
        for mode in items:
            score = score_answers(answers[(s, mode)], items[mode], world.attributes)
            row[mode] = {k: score[k] for k in ("truthful_rate", "false_rate", "expected_lie_rate", "well_formed_rate")}
        rows.append(row)
    result = {
        "organism": str(model), "training": {k: v for k, v in record["training"].items() if k != "history"},
        "fit": json.loads(report.to_json()), "rows": rows, "seconds": time.time() - t0,
        "n_eval_per_mode": {m: len(v) for m, v in items.items()},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("\n| setting | lying ctx: truthful | lying ctx: well-formed | honest ctx: truthful | honest ctx: well-formed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['lying']['truthful_rate']:.3f} | {row['lying']['well_formed_rate']:.3f} "
              f"| {row['honest']['truthful_rate']:.3f} | {row['honest']['well_formed_rate']:.3f} |")
    print(f"\n({len(items['lying'])} held-out prompts per context mode; {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
