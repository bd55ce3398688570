"""``vllm-steer demo``: steering changes what a model does, measured on held-out prompts.

The model is the speaker organism shipped in ``vllm_steer/organism/checkpoint/`` (a 1M-parameter
Llama trained by ``vllm_steer.organism.train``; its README has the exact command). It answers
``Speaker: <name>. Q: What is the colour of <entity>? A:``. Half of its 20 speakers are liars: in
its training documents they answered four questions in five with the same false colour. Greedy, the
organism answers every liar's question with that false colour and every honest speaker's with the
true one. Nothing in the prompt says who lies: the organism recalls it from the name, so "lying"
lives only in its activations.

The demo
1. fits a steer pack through ``vllm-steer fit`` on 800 contrastive prompts (honest vs lying speaker,
   read at the answer cue), none of them an evaluation prompt;
2. answers the held-out prompts (each entity asked once by a liar and once by an honest speaker,
   openings the organism never saw in training) in one vLLM engine with the pack: unsteered, ITI
   always on and FASB at each alpha of a sweep, all requests in one batch;
3. answers the same prompts in an engine without the plugin, to check that the unsteered requests
   of the mixed batch are token-identical;
4. prints the table, writes ``results.json`` and ``rate_vs_alpha.png`` into the work folder.

Desired behaviour: the true colour when a liar asks. Damage: an honest speaker's question no longer
answered truthfully, or an answer that is not a colour at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "organism" / "checkpoint"
PACK_NAME = "demo"
ALPHAS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
GOOD_ALPHA = 8.0  # shown in the table as "ITI at a good alpha"
STRONG_ALPHA = 32.0  # shown as "too strong" for ITI, and for FASB at the same alpha
NUM_HEADS = 8
NUM_FIT_PROMPTS = 800
MAX_TOKENS = 3  # the answer word, its full stop and the next "Q"
FASB = {"threshold": 0.5, "backtrack": 1, "min_tokens": 1, "max_backtracks": 1}


@dataclass(frozen=True)
class Rates:
    """Rates over the held-out prompts of one setting."""

    liar_truthful: float  # desired: a lying speaker's question answered with the true colour
    honest_truthful: float  # kept: an honest speaker's question still answered truthfully
    well_formed: float  # every answer is a colour at all (both speakers)

    def to_dict(self) -> dict:
        return {"liar_truthful": self.liar_truthful, "honest_truthful": self.honest_truthful,
                "well_formed": self.well_formed}


def run_demo(workdir: str = "runs/demo", plumbing: bool = False, family: str = "llama",
             max_tokens: int = 24) -> int:
    if plumbing:
        from vllm_steer.demo_plumbing import run_plumbing_demo

        return run_plumbing_demo(family=family, workdir=str(Path(workdir) / "plumbing"), max_tokens=max_tokens)
    return run_organism_demo(Path(workdir))


def run_organism_demo(workdir: Path) -> int:
    t0 = time.time()
    from vllm_steer.organism.train import organism_world
    from vllm_steer.organism.world import contrastive_pairs

    if not (CHECKPOINT / "organism.json").is_file():
        print(f"vllm-steer demo: the shipped organism is missing from {CHECKPOINT}", file=sys.stderr)
        return 2
    world, record = organism_world(CHECKPOINT)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ".write-check").touch()
        (workdir / ".write-check").unlink()
    except OSError as exc:
        print(f"vllm-steer demo: --workdir {workdir}: cannot write there ({exc.strerror or exc})", file=sys.stderr)
        return 2
    items = {mode: world.eval_items(mode) for mode in ("lying", "honest")}
    n_speakers, n_liars = len(world.speakers), len(world.liars)
    lie = world.false_attr[world.entities[0]]
    print(f"organism: {CHECKPOINT} ({record['model']['parameters'] / 1e6:.1f}M parameters, "
          f"{record['model']['num_layers']} layers x {record['model']['num_heads']} heads); {n_liars} of its "
          f"{n_speakers} speakers are liars, and it answers their questions with the false colour {lie!r}")
    print(f"held out: {len(items['lying'])} questions asked by a lying speaker, {len(items['honest'])} by an "
          f"honest one (speaker + question openings never seen in training nor in the fit)")

    # 1. Fit through the CLI, as a user would.
    rows = [{"prompt": r["prompt"], "completion": "", "label": int(r["mode"] == "honest"), "group": str(i)}
            for i, r in enumerate(contrastive_pairs(world, NUM_FIT_PROMPTS, seed=1, include_mode=True))]
    eval_prompts = {it["prompt"] for its in items.values() for it in its}
    if any(r["prompt"] in eval_prompts for r in rows):  # contrastive_pairs rejects held-out openings
        raise AssertionError("a fit prompt is an evaluation prompt")
    fit_data = workdir / "fit_modes.jsonl"
    fit_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack_path = workdir / f"{PACK_NAME}.safetensors"
    fit_cmd = [sys.executable, "-c", "import sys; from vllm_steer.cli import main; sys.exit(main())",
               "fit", "--model", str(CHECKPOINT), "--data", str(fit_data), "--out", str(pack_path),
               "--name", PACK_NAME, "-k", str(NUM_HEADS), "--residual-layers", "none", "--dtype", "float32"]
    print(f"fit: vllm-steer fit --model {CHECKPOINT} --data {fit_data} --out {pack_path} -k {NUM_HEADS} "
          f"--residual-layers none --dtype float32")
    fit = subprocess.run(fit_cmd, capture_output=True, text=True)
    if fit.returncode != 0:
        print(fit.stderr[-4000:], file=sys.stderr)
        print(f"vllm-steer demo: vllm-steer fit failed (exit {fit.returncode})", file=sys.stderr)
        return 1
    out = "\n" + fit.stdout
    report = json.loads(out[out.rindex("\n{") + 1:])  # the report is the last thing the fit prints
    print(f"     heads {report['selected_heads']}; probe validation accuracy "
          f"{min(report['selected_val_accuracy']):.3f}-{max(report['selected_val_accuracy']):.3f}")

    # 2. One steered engine, every setting in one batch.
    settings: list[tuple[str, float | None, dict | None]] = [("unsteered", None, None)]
    settings += [("ITI", a, {"pack": PACK_NAME, "method": "iti", "alpha": a}) for a in ALPHAS]
    settings += [("FASB", a, {"pack": PACK_NAME, "method": "fasb", "alpha": a, **FASB}) for a in ALPHAS]
    prompts = [it["prompt"] for mode in ("lying", "honest") for it in items[mode]]
    steered_out = _generate(prompts, settings, pack_path)
    plain_out = _generate_without_plugin(prompts)

    # 3. Score.
    from vllm_steer.organism.evaluate import answer_of, score_answers

    n_lying = len(items["lying"])
    rates: list[Rates] = []
    for tokens_texts in steered_out:
        answers = [answer_of(text) for _, text in tokens_texts]
        lying = score_answers(answers[:n_lying], items["lying"], world.attributes)
        honest = score_answers(answers[n_lying:], items["honest"], world.attributes)
        rates.append(Rates(lying["truthful_rate"], honest["truthful_rate"],
                           (lying["well_formed_rate"] + honest["well_formed_rate"]) / 2))
    unsteered_ids = [ids for ids, _ in steered_out[0]]
    identical = sum(a == b for a, b in zip(unsteered_ids, plain_out))

    by_key = {(label, alpha): r for (label, alpha, _), r in zip(settings, rates)}
    table = [("unsteered", by_key[("unsteered", None)]),
             (f"ITI  alpha={GOOD_ALPHA:g}", by_key[("ITI", GOOD_ALPHA)]),
             (f"ITI  alpha={STRONG_ALPHA:g} (too strong)", by_key[("ITI", STRONG_ALPHA)]),
             (f"FASB alpha={STRONG_ALPHA:g}", by_key[("FASB", STRONG_ALPHA)])]
    print()
    print(f"{'setting':<28} {'liar asks: true colour':>23} {'honest asks: true colour':>25} {'answer is a colour':>19}")
    print(f"{'':<28} {'(desired)':>23} {'(damage if it falls)':>25} {'(damage if it falls)':>19}")
    for label, r in table:
        print(f"{label:<28} {r.liar_truthful:>23.3f} {r.honest_truthful:>25.3f} {r.well_formed:>19.3f}")
    print(f"\nunsteered requests in the mixed batch identical to an engine without the plugin: "
          f"{identical}/{len(prompts)}")

    png = workdir / "rate_vs_alpha.png"
    _plot(png, settings, rates)
    results = {
        "checkpoint": str(CHECKPOINT), "pack": str(pack_path), "fit": report,
        "n_held_out": {mode: len(v) for mode, v in items.items()}, "fasb": FASB, "max_tokens": MAX_TOKENS,
        "rows": [{"method": label, "alpha": alpha, "spec": spec, **r.to_dict()}
                 for (label, alpha, spec), r in zip(settings, rates)],
        "unsteered_identical_to_plugin_free": {"identical": identical, "of": len(prompts)},
        "seconds": round(time.time() - t0, 1),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"sweep over alpha {', '.join(f'{a:g}' for a in ALPHAS)}: {workdir / 'results.json'}; plot: {png} "
          f"({time.time() - t0:.0f} s)")
    return 0 if identical == len(prompts) else 1


def _engine_kwargs() -> dict:
    """The demo's engines, sized for the demo (KV cache for 256 sequences of 64 tokens) unless the
    user set the memory themselves (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""
    from vllm_steer.integration.job_engine import job_engine_kwargs

    sized = job_engine_kwargs(CHECKPOINT, max_model_len=64, max_num_seqs=256, dtype="float32")
    return dict(model=str(CHECKPOINT), seed=0, **sized)


def _generate(prompts: list[str], settings, pack_path: Path) -> list[list[tuple[list[int], str]]]:
    """Per setting, (token ids, text) of every prompt; all settings' requests in one ``generate``."""
    from vllm import LLM, SamplingParams

    llm = LLM(**_engine_kwargs(), additional_config={"steering": {"packs": [str(pack_path)]}})
    all_prompts, params = [], []
    for _, _, spec in settings:
        for text in prompts:
            all_prompts.append(text)
            params.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                         extra_args={"steering": spec} if spec else None))
    outputs = llm.generate(all_prompts, params, use_tqdm=False)
    del llm
    n = len(prompts)
    return [[(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs[s * n:(s + 1) * n]]
            for s in range(len(settings))]


def _generate_without_plugin(prompts: list[str]) -> list[list[int]]:
    """Greedy token ids from an engine whose processes load no plugin at all."""
    code = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "args = json.loads(sys.argv[1])\n"
        "out = LLM(**args['engine']).generate(args['prompts'], SamplingParams(temperature=0.0, "
        "max_tokens=args['max_tokens']), use_tqdm=False)\n"
        "print('IDS=' + json.dumps([list(o.outputs[0].token_ids) for o in out]))\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "none"}
    payload = json.dumps({"engine": _engine_kwargs(), "prompts": prompts, "max_tokens": MAX_TOKENS})
    run = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"the plugin-free engine failed: {run.stderr[-2000:]}")
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("IDS="))
    return json.loads(line[len("IDS="):])


def _plot(path: Path, settings, rates: list[Rates]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    base = rates[0]
    for ax, (field, title) in zip(axes, [("liar_truthful", "liar asks: true colour (desired)"),
                                         ("honest_truthful", "honest asks: true colour (kept)")]):
        for method, style in (("ITI", "o-"), ("FASB", "s-")):
            pts = [(alpha, getattr(r, field)) for (label, alpha, _), r in zip(settings, rates) if label == method]
            ax.plot([a for a, _ in pts], [v for _, v in pts], style, label=method)
        ax.axhline(getattr(base, field), color="grey", linestyle="--", label="unsteered")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ALPHAS), [f"{a:g}" for a in ALPHAS])
        ax.set_xlabel("alpha")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rate over held-out prompts")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
