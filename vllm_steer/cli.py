"""The ``vllm-steer`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["fit", "l2s"]:
        return _run_fit_l2s(argv[2:])
    parser = argparse.ArgumentParser(prog="vllm-steer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="steered vs unsteered generation on a tiny model built offline")
    demo.add_argument("--family", choices=["llama", "qwen2", "qwen3"], default="llama")
    demo.add_argument("--workdir", default="runs/demo", help="where the model and pack are written")
    demo.add_argument("--max-tokens", type=int, default=24)

    fit = sub.add_parser("fit", help="fit a steer pack (probes, top-K heads, directions, sigma) through vLLM; "
                                     "'vllm-steer fit l2s --help' fits an L2S predictor")
    fit.add_argument("--model", required=True, help="HF checkpoint folder")
    fit.add_argument("--data", required=True,
                     help="TruthfulQA (mc_task.json, TruthfulQA.csv or their folder) or a JSONL of pairs")
    fit.add_argument("--out", required=True, help="output pack, e.g. packs/truthful.safetensors")
    fit.add_argument("--name", help="pack name (default: the output file's stem)")
    fit.add_argument("-k", "--num-heads", type=int, default=48, help="K, heads to steer (default 48)")
    fit.add_argument("--seed", type=int, default=42)
    fit.add_argument("--val-fraction", type=float, default=0.2)
    fit.add_argument("--position", choices=["last", "mean"], default="last",
                     help="activations at the last token of prompt+completion, or the completion's mean")
    fit.add_argument("--direction", choices=["mass_mean", "probe"], default="mass_mean")
    fit.add_argument("--residual-layers", default="all", help="'all', 'none' or a comma list of layers")
    fit.add_argument("--max-model-len", type=int, default=1024)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--dtype", default="float32")
    fit.add_argument("--tensor-parallel-size", type=int, default=1)

    ev = sub.add_parser("eval", help="TruthfulQA MC1/MC2/MC3 for several steering settings, sharded over "
                                     "Ray actors or in this process; resumable")
    ev.add_argument("--model", required=True, help="HF checkpoint folder")
    ev.add_argument("--benchmark", choices=["truthfulqa_mc", "truthfulqa_gen", "short_answer"],
                    default="truthfulqa_mc")
    ev.add_argument("--data", required=True,
                    help="TruthfulQA's mc_task.json (truthfulqa_mc), TruthfulQA.csv (truthfulqa_gen) or a "
                         "short-answer JSONL (short_answer, e.g. from benchmarks/organism/export_items.py)")
    ev.add_argument("--max-tokens", type=int, default=50, help="truthfulqa_gen / short_answer: new tokens per answer")
    ev.add_argument("--instruction-file", help="truthfulqa_gen: the instruction text (default: the project's)")
    ev.add_argument("--primer-file", help="truthfulqa_gen: the few-shot QA primer (default: the project's)")
    ev.add_argument("--out", required=True, help="job folder (re-running with the same folder resumes)")
    ev.add_argument("--pack", action="append", default=[], help="a steer pack to load (repeatable)")
    ev.add_argument("--setting", action="append", default=[],
                    help="'none' or a steering spec as JSON, e.g. '{\"pack\": \"truthful\", \"alpha\": 5}' "
                         "(repeatable; default: none)")
    ev.add_argument("--alphas", help="with one --setting: repeat it at each of these alphas (comma list)")
    ev.add_argument("--folds", type=int, default=1,
                    help="K-fold: question q is scored with pack '<pack>.fold<k>' for its fold k (by its text)")
    ev.add_argument("--fold-seed", type=int, default=0)
    ev.add_argument("--fit-folds", metavar="NAME",
                    help="first fit one pack per fold on the other folds' questions of --fit-data (default: "
                         "--data, an mc_task.json), named NAME.fold<k>, into <out>/packs; settings name NAME")
    ev.add_argument("--fit-data", help="with --fit-folds: TruthfulQA's mc_task.json")
    ev.add_argument("--fit-k", type=int, default=48, help="with --fit-folds: K heads per pack")
    ev.add_argument("--shards", type=int, default=4)
    ev.add_argument("--limit", type=int, help="the first N questions only")
    ev.add_argument("--actors", type=int, default=0, help="Ray actors, one engine each (0: run in this process)")
    ev.add_argument("--ray-address", help="an existing Ray cluster (default: a local one)")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--max-model-len", type=int, default=1024)

    args = parser.parse_args(argv)
    if args.command == "fit":
        return _run_fit(args)
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "demo":
        from vllm_steer.demo import run_demo

        return run_demo(family=args.family, workdir=args.workdir, max_tokens=args.max_tokens)
    parser.error(f"unknown command {args.command}")
    return 2


def _run_fit(args) -> int:
    from pathlib import Path

    from vllm_steer.errors import SteeringError
    from vllm_steer.fit.pipeline import FitOptions, fit_steer_pack

    if args.residual_layers in ("all", "none"):
        residual_layers = args.residual_layers
    else:
        try:
            residual_layers = [int(x) for x in args.residual_layers.split(",") if x.strip()]
        except ValueError:
            print(f"error: --residual-layers must be 'all', 'none' or a comma list, got {args.residual_layers!r}",
                  file=sys.stderr)
            return 2
    options = FitOptions(
        name=args.name or Path(args.out).stem, num_heads=args.num_heads, seed=args.seed,
        val_fraction=args.val_fraction, position=args.position, direction=args.direction,
        residual_layers=residual_layers, max_model_len=args.max_model_len, batch_size=args.batch_size,
        llm_kwargs={"dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size},
    )
    try:
        report = fit_steer_pack(args.model, args.data, args.out, options)
    except SteeringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json())
    return 0


def _run_fit_l2s(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from vllm_steer.errors import SteeringError
    from vllm_steer.fit.l2s import L2STrainOptions
    from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack

    parser = argparse.ArgumentParser(prog="vllm-steer fit l2s",
                                     description="fit an L2S predictor and Mean-S through vLLM")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSONL pairs/labelled rows or TruthfulQA")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name")
    parser.add_argument("--read-layer", type=int, required=True, help="L': the predictor's input layer")
    parser.add_argument("--steer-layer", type=int, required=True, help="L*: where the vector is added")
    parser.add_argument("--target", choices=["last", "average"], default="last")
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--loss", choices=["reference", "mse"], default="reference")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    options = L2SFitOptions(
        name=args.name or Path(args.out).stem, read_layer=args.read_layer, steer_layer=args.steer_layer,
        target=args.target, max_model_len=args.max_model_len, llm_kwargs={"dtype": args.dtype},
        train=L2STrainOptions(width=args.width, loss=args.loss, lr=args.lr, epochs=args.epochs, seed=args.seed),
    )
    try:
        record = fit_l2s_pack(args.model, args.data, args.out, options)
    except SteeringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _run_eval(args) -> int:
    import json

    from vllm_steer.errors import SteeringError
    from vllm_steer.eval.job import EvalJob, Setting, run_job

    try:
        specs = []
        for text in args.setting or ["none"]:
            if text.strip().lower() == "none":
                specs.append(None)
                continue
            try:
                spec = json.loads(text)
            except ValueError as exc:
                raise SteeringError(f"--setting {text!r} is neither 'none' nor JSON: {exc}", field="--setting")
            if not isinstance(spec, dict):
                raise SteeringError(f"--setting {text!r} must be a JSON object", field="--setting")
            specs.append(spec)
        if args.alphas:
            steered = [s for s in specs if s is not None]
            if len(steered) != 1:
                raise SteeringError("--alphas needs exactly one steered --setting", field="--alphas")
            alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
            specs = [s for s in specs if s is None] + [{**steered[0], "alpha": a} for a in alphas]
        from pathlib import Path

        texts = {name: Path(path).read_text() if path else None
                 for name, path in (("instruction", args.instruction_file), ("primer", args.primer_file))}
        packs = list(args.pack)
        if args.fit_folds:
            from vllm_steer.eval.folds import fit_fold_packs
            from vllm_steer.fit.pipeline import FitOptions

            if args.folds < 2:
                raise SteeringError("--fit-folds needs --folds 2 or more", field="--folds")
            packs += map(str, fit_fold_packs(
                args.model, args.fit_data or args.data, args.folds, args.fold_seed, Path(args.out) / "packs",
                FitOptions(name=args.fit_folds, num_heads=args.fit_k, max_model_len=args.max_model_len,
                           llm_kwargs={"dtype": args.dtype})))
        job = EvalJob(model=args.model, data=args.data, packs=tuple(packs), benchmark=args.benchmark,
                      folds=args.folds, fold_seed=args.fold_seed,
                      settings=tuple(Setting(s) for s in specs), num_shards=args.shards, limit=args.limit,
                      engine={"dtype": args.dtype, "max_model_len": args.max_model_len},
                      max_tokens=args.max_tokens, **texts)
        report = run_job(job, args.out, num_actors=args.actors, ray_address=args.ray_address)
    except SteeringError as exc:
        print(f"vllm-steer eval: {exc}", file=sys.stderr)
        return 2
    for failure in report.failed:
        print(f"vllm-steer eval: failed: {failure}", file=sys.stderr)
    if not report.complete:
        print(f"vllm-steer eval: {len(report.failed)} unit(s) failed; run the same command again to resume",
              file=sys.stderr)
        return 1
    print((report.out / "summary.md").read_text(), end="")
    print(f"results: {report.out / 'results.json'}; plot: {report.out / 'summary.png'}")
    return 0

