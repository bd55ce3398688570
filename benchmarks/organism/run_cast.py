"""One command: CAST (conditional activation steering) on the speaker organism: none / always-on
steering / the same steering gated by a "the speaker is a liar" condition, side by side.

    python -m benchmarks.organism.run_cast --out /tmp/orgcast     # the organism shipped for the demo

Steps:
1. the organism (``--organism``, default: the checkpoint shipped in ``vllm_steer/organism/checkpoint``);
   it must be a speaker world;
2. the condition. ``--num-condition-prompts`` labelled prompts (a speaker line and a question, the
   evaluation form; from ``contrastive_pairs``, so never an evaluation opening), ``condition`` true
   when the speaker is a liar, false when honest; ``vllm-steer fit cast`` (through vLLM) picks the
   layer, threshold and comparison by validation F1 (``--condition-layers`` restricts the layers) and
   writes the condition pack ``liar``;
3. the behaviour: the truthfulness pack ``organism`` ("modes" contrast: honest- vs lying-speaker
   prompts read at the answer cue; ITI heads and residual vectors), fitted exactly as ``run_fasb``
   fits it (``fit_modes_pack``);
4. evaluation on the held-out questions, each asked by a lying and an honest speaker, greedy,
   ``--max-tokens`` tokens, one vLLM engine holding both packs, one ``generate``:
     none                 unsteered
     ITI alpha=a          method "iti" on every request (always-on)
     CAST ITI alpha=a     the same spec plus ``"condition": "liar"``
     residual alpha=a     method "residual" on every request
     CAST residual a      the same plus the condition.

Reported per speaker group (lying = the group the condition should select, honest = the other):
truthful, false and well-formed rates; how many answers differ from the unsteered ones; and the
gate. The engine does not report a request's gate, so it is inferred two ways: (a) predicted with
plain transformers, from the pack's own direction, layer, threshold and comparison on each evaluation
prompt's mean layer-input state (the formula the engine applies in the prefill); (b) read from the
answers: among the prompts whose always-on answer differs from the unsteered one, the share whose
CAST answer equals the always-on answer (the gate was on) rather than the unsteered one (off); (b)
holds only when the conditioned request is steered at the answer cue (see below).

The engine gates a conditioned request's last prompt token in its own forward, so a spec steering
that token (``prompt_positions: last``) must steer only layers after the condition is read (ITI heads
at layers >= the condition layer, residual vectors at layers >= condition layer - 1); any other is
refused (400 naming ``prompt_positions``). This organism decides its answer at the last prompt
token, so a refused setting is reported and left out (``prompt_positions: none`` would steer after
the answer cue). With the default candidate layers the fit reaches validation F1 1.000 at every
layer and keeps the first, layer 1, where the pack's ITI heads (layer 1) and residual vectors
(layers 0-3) all qualify; ``--condition-layers 3`` shows the other case.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


CONDITION_PACK = "liar"
BEHAVIOUR_PACK = "organism"  # the name fit_modes_pack gives its pack


def liar_condition_rows(world, n: int, seed: int = 4) -> list[dict]:
    """``n`` labelled prompts ``{"prompt", "condition"}``: a speaker line and a question (half of the
    speakers liars, in shuffled order), condition = the speaker lies. ``contrastive_pairs`` rejects
    evaluation openings; the seed differs from the behaviour pack's fitting data (seed 1)."""
    from vllm_steer.organism.world import contrastive_pairs

    return [{"prompt": r["prompt"], "condition": r["mode"] == "lying"}
            for r in contrastive_pairs(world, n, seed=seed, include_mode=True)]


def predicted_gates(model: Path, condition_pack, prompts: list[str], batch_size: int = 64):
    """(similarity, gate) per prompt with plain transformers: the mean over all prompt tokens (BOS
    included, as the engine reads it) of the stream entering the condition layer, its
    ``cos(h, tanh(P h))`` with the pack's direction, and whether it meets the pack's threshold."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.fit.cast import ConditionPoint, condition_similarity
    from vllm_steer.organism.evaluate import _left_padded

    info = condition_pack.manifest.condition
    point = ConditionPoint(info.layer, info.threshold, info.comparison, f1=float("nan"))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model))
    sims = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(tok, prompts[i:i + batch_size])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        output_hidden_states=True).hidden_states[info.layer]
            weights = mask[..., None].float()
            states = (hidden * weights).sum(1) / weights.sum(1)
            sims.append(condition_similarity(states, condition_pack.condition_direction))
    sims = torch.cat(sims)
    return sims.tolist(), point.holds(sims).tolist()


def refusal(spec: dict, packs: dict) -> str | None:
    """The engine's check of ``spec`` against the packs: its error message, or None when accepted."""
    from vllm_steer.errors import SpecError
    from vllm_steer.pack_registry import PackRegistry
    from vllm_steer.spec import parse_spec

    registry = PackRegistry(model=next(iter(packs.values())).manifest.model)
    for pack in packs.values():
        registry.add(pack)
    try:
        registry.resolve_all(parse_spec({"steering": spec}))
    except SpecError as exc:
        return str(exc)
    return None


def group_row(world, items, texts, unsteered_texts, answers, unsteered, always_on=None) -> dict:
    """Rates of one speaker group under one setting, answers (first words) and whole completions
    changed vs unsteered, and, for a CAST setting (``always_on``: the answers under the same steering
    without the condition), the gate read from answers."""
    from vllm_steer.organism.evaluate import score_answers

    score = score_answers(answers, items, world.attributes)
    row = {k: score[k] for k in ("truthful_rate", "false_rate", "expected_lie_rate", "well_formed_rate")}
    row["changed_vs_none"] = sum(a != u for a, u in zip(answers, unsteered))
    row["completion_changed_vs_none"] = sum(t != u for t, u in zip(texts, unsteered_texts))
    row["example_completions"] = texts[:3]
    if always_on is not None:
        moved = [i for i, (o, u) in enumerate(zip(always_on, unsteered)) if o != u]
        row["always_on_moved"] = len(moved)
        row["gate_on_among_moved"] = sum(answers[i] == always_on[i] for i in moved)
        row["gate_off_among_moved"] = sum(answers[i] == unsteered[i] for i in moved)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/organism_cast", help="work folder: fitting data, packs, results")
    p.add_argument("--organism", help="a trained speaker organism (default: the demo's shipped checkpoint)")
    p.add_argument("--num-condition-prompts", type=int, default=400)
    p.add_argument("--condition-layers", default="",
                   help="candidate condition layers, comma-separated (default: every layer the fit allows)")
    p.add_argument("--num-pairs", type=int, default=800, help="behaviour pack: fitting prompts")
    p.add_argument("-k", "--num-heads", type=int, default=8)
    p.add_argument("--iti-alphas", default="8,32")
    p.add_argument("--residual-alphas", default="1,4")
    p.add_argument("--max-tokens", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from benchmarks.organism.run_fasb import fit_modes_pack
    from benchmarks.organism.run_l2s import speaker_organism
    from vllm_steer.fit.cast_pipeline import CastFitOptions, fit_cast_pack
    from vllm_steer.organism.evaluate import answer_of
    from vllm_steer.pack import load_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, world = speaker_organism(args.organism)
    items = {mode: world.eval_items(mode) for mode in ("lying", "honest")}
    eval_prompts = {it["prompt"] for its in items.values() for it in its}

    condition_data = out / "liar_condition.jsonl"
    rows = liar_condition_rows(world, args.num_condition_prompts)
    if any(r["prompt"] in eval_prompts for r in rows):
        raise SystemExit("a condition prompt is an evaluation prompt")  # contrastive_pairs prevents it
    condition_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    condition_path = out / "liar_condition.safetensors"
    layers = tuple(int(x) for x in args.condition_layers.split(",") if x.strip()) or None
    cast_fit = fit_cast_pack(str(model), condition_data, condition_path, CastFitOptions(
        name=CONDITION_PACK, layers=layers, max_model_len=256, progress=False))
    print(f"condition fit: layer {cast_fit['layer']}, {cast_fit['comparison']} {cast_fit['threshold']:g}, "
          f"validation F1 {cast_fit['val_f1']:.3f} ({cast_fit['num_train']} train / {cast_fit['num_val']} val "
          f"prompts); per layer: " + ", ".join(f"L{r['layer']} F1 {r['f1']:.3f}" for r in cast_fit["layers"]))

    behaviour_fit = fit_modes_pack(model, world, out, args.num_pairs, args.num_heads, "last")
    print(f"truthfulness fit: heads {behaviour_fit.selected_heads}; selected val accuracy "
          f"{['%.3f' % a for a in behaviour_fit.selected_val_accuracy]}")
    behaviour_path = behaviour_fit.pack_path
    packs = {BEHAVIOUR_PACK: load_pack(behaviour_path), CONDITION_PACK: load_pack(condition_path)}

    settings = [("none", None, None)]
    for method, alphas in (("iti", _floats(args.iti_alphas)), ("residual", _floats(args.residual_alphas))):
        for a in alphas:
            spec = {"pack": BEHAVIOUR_PACK, "method": method, "alpha": a}
            label = f"{'ITI' if method == 'iti' else method} alpha={a:g}"
            settings.append((label, spec, None))
            settings.append((f"CAST {label}", {**spec, "condition": CONDITION_PACK}, len(settings) - 1))
    refused = {label: why for label, spec, base in settings if base is not None and (why := refusal(spec, packs))}
    kept = [s for s in settings if s[0] not in refused]
    position = {label: i for i, (label, _, _) in enumerate(kept)}  # a CAST row's base, by its label
    settings = [(label, spec, None if base is None else position[settings[base][0]]) for label, spec, base in kept]

    llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=256, seed=0,
              additional_config={"steering": {"packs": [str(behaviour_path), str(condition_path)]}})
    prompts, params, index = [], [], []
    for s, (_, spec, _) in enumerate(settings):
        for mode, mode_items in items.items():
            for it in mode_items:
                prompts.append(it["prompt"])
                params.append(SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                             extra_args={"steering": spec} if spec else None))
                index.append((s, mode))
    t_gen = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    gen_seconds = time.time() - t_gen
    del llm
    texts: dict[tuple[int, str], list] = {}
    for (s, mode), o in zip(index, outputs):
        texts.setdefault((s, mode), []).append(o.outputs[0].text)
    answers = {key: [answer_of(t) for t in group] for key, group in texts.items()}

    gate_prediction = {}
    for mode, its in items.items():
        sims, gates = predicted_gates(model, packs[CONDITION_PACK], [it["prompt"] for it in its])
        gate_prediction[mode] = {"gate_on": sum(gates), "n": len(gates), "similarity_min": min(sims),
                                 "similarity_max": max(sims), "similarity_mean": sum(sims) / len(sims)}

    result_rows = []
    for s, (label, spec, base) in enumerate(settings):
        row = {"setting": label, "spec": spec}
        for mode in items:
            row[mode] = group_row(world, items[mode], texts[(s, mode)], texts[(0, mode)], answers[(s, mode)],
                                  answers[(0, mode)], answers[(base, mode)] if base is not None else None)
        result_rows.append(row)
    result = {
        "organism": str(model), "args": vars(args), "condition_fit": cast_fit,
        "behaviour_fit": json.loads(behaviour_fit.to_json()), "condition_pack": str(condition_path),
        "behaviour_pack": str(behaviour_path), "gate_predicted_hf": gate_prediction, "rows": result_rows,
        "n_eval_per_group": {m: len(v) for m, v in items.items()}, "generate_seconds": gen_seconds,
        "refused_settings": refused,
        "seconds": time.time() - t0,
    }
    (out / "cast_results.json").write_text(json.dumps(result, indent=2))

    n = len(items["lying"])
    print(f"\ncondition '{CONDITION_PACK}': layer {cast_fit['layer']}, {cast_fit['comparison']} "
          f"{cast_fit['threshold']:g}, validation F1 {cast_fit['val_f1']:.3f}; predicted gate on the evaluation "
          f"prompts (HF): lying {gate_prediction['lying']['gate_on']}/{n}, honest "
          f"{gate_prediction['honest']['gate_on']}/{n}")
    for label, why in refused.items():
        print(f"NOTE {label}: left out, the engine refuses it: {why}")
    print(f"{n} questions per speaker group, greedy, {args.max_tokens} tokens; 'changed' = answers that differ "
          f"from unsteered (whole completions in brackets); 'gate on/off | moved' = among the prompts "
          f"always-on moved, CAST answers equal to always-on / to unsteered")
    print("\n| setting | lying: truthful | lying: false | lying: well-formed | lying: changed | lying: gate on/off "
          "\\| moved | honest: truthful | honest: false | honest: well-formed | honest: changed | honest: gate "
          "on/off \\| moved |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result_rows:
        cells = [row["setting"]]
        for mode in ("lying", "honest"):
            g = row[mode]
            gate = (f"{g['gate_on_among_moved']}/{g['gate_off_among_moved']} \\| {g['always_on_moved']}"
                    if "always_on_moved" in g else "")
            cells += [f"{g['truthful_rate']:.3f}", f"{g['false_rate']:.3f}", f"{g['well_formed_rate']:.3f}",
                      f"{g['changed_vs_none']}/{n} ({g['completion_changed_vs_none']})", gate]
        print("| " + " | ".join(cells) + " |")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
