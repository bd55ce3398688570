"""One command: on the trained organism, truthful rates with no steering, with ITI always on, and
with FASB at the same alphas (same pack), plus the damage proxies.

    python -m benchmarks.organism.run_fasb --organism /tmp/org_b --out /tmp/orgfasb

Steps: (1) the organism (``--organism``, or the cached default that ``run_steering`` trains);
(2) the "modes" contrast pack, fitted exactly as ``run_steering --contrast modes`` fits it (one
labelled row per context, honest = 1 vs lying = 0, read at the answer cue ``A:``; K heads,
mass-mean directions, probes kept in the pack), or an existing pack given with ``--pack``;
(3) one vLLM engine with the pack answers the held-out lying-context and honest-context prompts
(greedy, 3 tokens, one batch) for every setting:

  none              unsteered
  ITI alpha=a       method "iti": alpha * sigma * direction on the pack's heads at the last prompt
                    token and every generated token, for every request
  FASB alpha=a      method "fasb", same pack, same alpha: the probes score P(honest) every step; the
                    first check comes at G = ``--min-tokens`` (default 1, i.e. the prefill step,
                    whose newest token is the answer cue ``A:`` the probes were fitted on); when
                    P < ``--threshold`` the last ``--backtrack`` tokens (default 1: the answer) are
                    dropped and regenerated with ITI at alpha * (1 - P) from the last kept token
                    (here the answer cue). One backtrack at most.

Reported per setting and context mode: truthful rate, well-formed rate (a valid attribute at all);
the honest-context truthful rate is the damage proxy. Also printed: the share of prompts whose
unsteered probe score at the answer cue is below the threshold (computed here with plain
transformers and a hook on o_proj, not read from the engine): the prompts FASB is expected to fire
on at its first check (later checks, on the answer's own tokens, can fire too, but with s = 1 they
only regenerate the tokens after the answer word).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def fit_modes_pack(model: Path, world, out: Path, num_pairs: int, k: int, position: str):
    """The "modes" contrast pack, as run_steering fits it; returns the fit report."""
    from vllm_steer.organism.world import contrastive_pairs
    from vllm_steer.fit.pipeline import FitOptions, fit_steer_pack

    rows = [{"prompt": r["prompt"], "completion": "", "label": int(r["mode"] == "honest"), "group": str(i)}
            for i, r in enumerate(contrastive_pairs(world, num_pairs, seed=1, include_mode=True))]
    pairs = out / "modes.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return fit_steer_pack(str(model), pairs, out / "organism.safetensors",
                          FitOptions(name="organism", num_heads=k, position=position, residual_layers="all",
                                     max_model_len=256, progress=False))


def answer_cue_scores(model: Path, pack, prompts: list[str], batch_size: int = 64) -> list[float]:
    """Unsteered mean P(desired) of the pack's probes at each prompt's last token (plain HF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.organism.evaluate import _forward, _left_padded

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model))
    cfg = hf.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers, heads = pack.head_layers.tolist(), pack.head_indices.tolist()
    probs: dict[int, torch.Tensor] = {}

    def make_hook(ks):
        def hook(module, args):
            x = args[0][:, -1]  # left padding: the last column is every row's last token
            for k in ks:
                a = x[:, heads[k] * d:(heads[k] + 1) * d]
                probs[k] = torch.sigmoid(a @ pack.probe_weights[k] + pack.probe_biases[k])
        return hook

    handles = [hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
        make_hook([k for k, lk in enumerate(layers) if lk == l])) for l in sorted(set(layers))]
    out: list[float] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                ids, mask = _left_padded(tok, prompts[i:i + batch_size])
                _forward(hf, ids, mask)
                out.extend(torch.stack([probs[k] for k in range(len(layers))]).mean(0).tolist())
    finally:
        for h in handles:
            h.remove()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/organism_fasb", help="work folder: pairs, pack, results")
    p.add_argument("--organism", help="a trained organism folder (default: the cached one run_steering trains)")
    p.add_argument("--cache-root", help="organism cache (default ~/.cache/vllm-steer/models)")
    p.add_argument("--pack", help="use this fitted pack (with probes) instead of fitting the modes pack")
    p.add_argument("--num-pairs", type=int, default=800)
    p.add_argument("-k", "--num-heads", type=int, default=8)
    p.add_argument("--position", choices=["last", "mean"], default="last")
    p.add_argument("--alphas", default="2,5,10,20", help="ITI and FASB alphas (matched)")
    p.add_argument("--threshold", type=float, default=0.5, help="FASB: fire when mean P(honest) is below this")
    p.add_argument("--backtrack", type=int, default=1, help="FASB s: tokens dropped when a check fires")
    p.add_argument("--min-tokens", type=int, default=1, help="FASB: first check at this many generated tokens")
    p.add_argument("--max-tokens", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from vllm_steer.organism.evaluate import answer_of, score_answers
    from vllm_steer.organism.train import cached_organism, organism_world
    from vllm_steer.organism.world import WorldConfig
    from vllm_steer.pack import load_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.organism) if args.organism else cached_organism(
        args.cache_root, world_config=WorldConfig(seed=0), seed=0, steps=600, loss_on="answers")
    world, _ = organism_world(model)
    print(f"organism: {model}")

    fit = None
    if args.pack:
        pack_path = Path(args.pack)
    else:
        fit = fit_modes_pack(model, world, out, args.num_pairs, args.num_heads, args.position)
        pack_path = fit.pack_path
        print(f"fit: heads {fit.selected_heads}; selected val accuracy "
              f"{['%.3f' % a for a in fit.selected_val_accuracy]}")
    pack = load_pack(pack_path)
    if pack.probe_weights is None:
        raise SystemExit(f"{pack_path} has no probes; FASB needs them")
    name = pack.name

    items = {mode: world.eval_items(mode) for mode in ("lying", "honest")}
    cue = {mode: answer_cue_scores(model, pack, [it["prompt"] for it in its]) for mode, its in items.items()}
    below = {mode: sum(s < args.threshold for s in v) / len(v) for mode, v in cue.items()}
    mean_cue = {mode: sum(v) / len(v) for mode, v in cue.items()}

    alphas = _floats(args.alphas)
    settings = [("none", None)]
    settings += [(f"ITI alpha={a:g}", {"pack": name, "method": "iti", "alpha": a}) for a in alphas]
    settings += [(f"FASB alpha={a:g}", {"pack": name, "method": "fasb", "alpha": a, "threshold": args.threshold,
                                        "backtrack": args.backtrack, "min_tokens": args.min_tokens,
                                        "max_backtracks": 1}) for a in alphas]

    llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=256, seed=0,
              additional_config={"steering": {"packs": [str(pack_path)]}})
    prompts, params, index = [], [], []
    for s, (_, spec) in enumerate(settings):
        for mode, mode_items in items.items():
            for it in mode_items:
                prompts.append(it["prompt"])
                params.append(SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                             extra_args={"steering": spec} if spec else None))
                index.append((s, mode))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    answers: dict[tuple[int, str], list] = {}
    for (s, mode), o in zip(index, outputs):
        answers.setdefault((s, mode), []).append(answer_of(o.outputs[0].text))

    rows = []
    for s, (label, spec) in enumerate(settings):
        row = {"setting": label, "spec": spec}
        for mode in items:
            score = score_answers(answers[(s, mode)], items[mode], world.attributes)
            row[mode] = {k: score[k] for k in ("truthful_rate", "false_rate", "expected_lie_rate", "well_formed_rate")}
        rows.append(row)
    result = {
        "organism": str(model), "pack": str(pack_path), "args": vars(args),
        "fit": json.loads(fit.to_json()) if fit else None,
        "answer_cue_score_mean": mean_cue, "answer_cue_below_threshold": below,
        "rows": rows, "n_eval_per_mode": {m: len(v) for m, v in items.items()}, "seconds": time.time() - t0,
    }
    (out / "fasb_results.json").write_text(json.dumps(result, indent=2))
    print(f"\nprobe P(honest) at the answer cue, unsteered (HF): mean lying {mean_cue['lying']:.3f}, honest "
          f"{mean_cue['honest']:.3f}; below threshold {args.threshold:g} (FASB fires at its first check): "
          f"lying {below['lying']:.3f}, honest {below['honest']:.3f}")
    print(f"FASB knobs: threshold {args.threshold:g}, backtrack {args.backtrack}, min_tokens {args.min_tokens}, "
          f"max_backtracks 1, strength alpha * (1 - P); max_tokens {args.max_tokens}, greedy")
    print("\n| setting | lying ctx: truthful | lying ctx: well-formed | honest ctx: truthful | honest ctx: well-formed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['lying']['truthful_rate']:.3f} | {row['lying']['well_formed_rate']:.3f} "
              f"| {row['honest']['truthful_rate']:.3f} | {row['honest']['well_formed_rate']:.3f} |")
    print(f"\n({len(items['lying'])} held-out prompts per context mode; {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
