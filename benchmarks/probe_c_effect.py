"""What the probes' regularisation does: C picked on the validation split (the default) vs a fixed
C = 1 (the ITI / FASB reference code's sklearn default), in one run on the shipped speaker organism.

    .venv/bin/python -m benchmarks.probe_c_effect --out runs/probe_c

Steps: (1) truth-labelled rows from the organism world, ITI-style: ``--pairs`` contrastive prompts
(a speaker, a question, the answer cue ``A:``), each followed once by the true colour (label 1) and
once by the entity's false colour (label 0), one group per prompt; (2) two packs fitted on them with
``vllm-steer fit``'s pipeline, identical except the probes' C (``FitOptions.probe_c`` None vs 1.0),
K = ``--k`` heads, activations at the last token (the answer); (3) FASB's MC scoring
(``eval.fasb_mc``, threshold ``--threshold``) on the held-out evaluation prompts (asked by lying
and by honest speakers), each with its true and its false answer. The answers are one token, so
with the default start offset 4 nothing would be checked; the run uses start offset 0, so the check
lands on the answer's last (only) token, the position the probes were fitted on.

Printed, per C setting: the chosen C, the validation accuracy of the selected heads (mean, best,
worst), and FASB's trigger rate (share of answers whose checked score is below the threshold) on
true answers and on false answers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHECKPOINT = Path(__file__).resolve().parents[1] / "vllm_steer" / "organism" / "checkpoint"
SETTINGS = (("validation-picked C (default)", None), ("fixed C = 1 (reference)", 1.0))


def truth_rows(world, pairs: int) -> list[dict]:
    from vllm_steer.organism.world import contrastive_pairs

    rows = []
    for i, r in enumerate(contrastive_pairs(world, pairs, seed=1, include_mode=True)):
        rows.append({"prompt": r["prompt"], "completion": r["positive"], "label": 1, "group": str(i)})
        rows.append({"prompt": r["prompt"], "completion": r["negative"], "label": 0, "group": str(i)})
    return rows


def mc_answers(world, tokenizer):
    """(McAnswer, is_true, mode) for each held-out prompt's true and false answer."""
    from vllm_steer.eval.fasb_mc import McAnswer

    out = []
    for mode in ("lying", "honest"):
        for item in world.eval_items(mode):
            prompt_ids = tokenizer(item["prompt"], add_special_tokens=True)["input_ids"]
            for answer, is_true in ((item["true_answer"], True), (item["false_answer"], False)):
                full = tokenizer(item["prompt"] + " " + answer, add_special_tokens=True)["input_ids"]
                assert full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids)
                out.append((McAnswer(tuple(prompt_ids), tuple(full[len(prompt_ids):])), is_true, mode))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/probe_c")
    parser.add_argument("--pairs", type=int, default=100, help="contrastive prompts (2 rows each)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--start-offset", type=int, default=0)
    parser.add_argument("--backtrack", type=int, default=10)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_steer.eval.fasb_mc import fasb_answer_logprobs
    from vllm_steer.fit.capture import capture_engine
    from vllm_steer.fit.pipeline import FitOptions, fit_steer_pack
    from vllm_steer.organism.train import organism_world
    from vllm_steer.pack import load_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world, _ = organism_world(CHECKPOINT)
    data = out / "truth_rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in truth_rows(world, args.pairs)))

    llm = capture_engine(str(CHECKPOINT), max_model_len=256, max_num_seqs=64)
    reports, paths = [], []
    try:
        for i, (label, c) in enumerate(SETTINGS):
            path = out / f"truth_c{i}.safetensors"
            reports.append(fit_steer_pack(str(CHECKPOINT), data, path, FitOptions(
                name=f"truth_c{i}", num_heads=args.k, residual_layers="none", probe_c=c, max_model_len=256,
                progress=False), llm=llm))
            paths.append(path)
    finally:
        del llm
    import gc

    gc.collect()

    tokenizer = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    answers = mc_answers(world, tokenizer)
    llm = capture_engine(str(CHECKPOINT), max_model_len=256, max_num_seqs=64,
                         additional_config={"steering": {"packs": [str(p) for p in paths]}})
    rows = []
    for (label, c), report, path in zip(SETTINGS, reports, paths):
        pack = load_pack(path)
        got = fasb_answer_logprobs(llm, pack, [a for a, _, _ in answers], alpha=args.alpha,
                                   threshold=args.threshold, backtrack=args.backtrack,
                                   skip_first=args.start_offset)
        fired = {True: [], False: []}
        for (_, is_true, _), g in zip(answers, got):
            fired[is_true].append(g.fired_at is not None)
        acc = report.selected_val_accuracy
        rows.append({
            "setting": label, "C": pack.manifest.metadata["probe_C"],
            "selection": pack.manifest.metadata["probe_C_selection"],
            "val_acc_mean": sum(acc) / len(acc), "val_acc_best": max(acc), "val_acc_worst": min(acc),
            "fire_true": sum(fired[True]) / len(fired[True]), "fire_false": sum(fired[False]) / len(fired[False]),
            "checked": sum(g.checked for g in got) / len(got),
        })
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    n = len(answers) // 2
    print(f"organism {CHECKPOINT.name}: {2 * args.pairs} truth-labelled rows ({args.pairs} prompts), K={args.k}, "
          f"val split by prompt (0.2, seed 42); FASB MC on {n} held-out prompts x (true, false) answer, "
          f"threshold {args.threshold}, start offset {args.start_offset}, s={args.backtrack}")
    print(f"{'setting':32s} {'C':>10s} {'val acc K heads mean/best/worst':>32s} "
          f"{'FASB fires: true ans':>21s} {'false ans':>10s}")
    for r in rows:
        cs = ",".join(f"{c:g}" for c in r["C"])
        print(f"{r['setting']:32s} {cs:>10s} {r['val_acc_mean']:>14.3f} /{r['val_acc_best']:.3f} /"
              f"{r['val_acc_worst']:.3f} {r['fire_true']:>21.3f} {r['fire_false']:>10.3f}")
    print(f"checked positions per answer: {rows[0]['checked']:.2f}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
