"""One command: on the speaker organism, a desired behaviour that depends on the input, and
none / Mean-S / L2S / P2S-oracle side by side.

    python -m benchmarks.organism.run_l2s --out /tmp/orgl2s      # the organism shipped for the demo

The task. The entities are split in two kinds by their index in the world (even: "straight",
odd: "trick"). For a question about a straight entity the desired answer is its true colour; for a
trick entity it is the lie (the organism's stock false colour). The kind is visible in the prompt (the
entity's name); whether the speaker lies is not written. Unsteered, the organism answers truthfully
for honest speakers and with the lie for lying ones, so half of its answers are the desired ones. To
get all of them a steering vector must push towards honesty for straight questions and towards lying
for trick questions: opposite directions. One fixed vector (Mean-S, the mean of the training targets)
cannot do both; a vector predicted from the prompt (L2S) can.

Steps:
1. the organism (``--organism``, default: the checkpoint shipped in ``vllm_steer/organism/checkpoint``);
   it must be a speaker world;
2. fitting data in the P2S form (contrastive prompts): for ``--num-pairs`` prompts X (a speaker and a
   question; no evaluation opening), X+ asks X's question through a speaker of the desired kind
   (honest for straight, lying for trick) and X- through one of the other kind;
3. ``vllm-steer fit l2s`` (through vLLM): the predictor reads layer L' (``--read-layer``) at X's last
   token; targets are the stream after layer L* (``--steer-layer``) at the last token of X+ minus X-
   (both end at the answer cue, where the organism decides); the pack also holds Mean-S;
4. evaluation on the held-out questions, each asked by a lying and an honest speaker, greedy,
   3 tokens:
     none            unsteered (vLLM)
     Mean-S alpha=a  method "mean_s": alpha * mean target at layer L*, from the last prompt token on
     L2S alpha=a     method "l2s": alpha * g(x) predicted in the prefill, from the last prompt token on
     P2S alpha=a     the oracle: alpha * the evaluation prompt's own target z = h(X+) - h(X-), built
                     the same way from its own question; applied with plain transformers and a forward
                     hook on layer L* (the engine has no per-request free vector), from the last prompt
                     token on like L2S (none is also run this way, as a check that both paths agree).

Reported per setting: the desired-answer rate (overall, per kind, per speaker kind) and the damage
proxy: the well-formed rate (the answer is a colour at all).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def entity_of(prompt: str) -> str:
    """The questioned entity of an organism prompt (``... What is the colour of Blorvu? A:``)."""
    return prompt.rsplit(" of ", 1)[1].split("?", 1)[0]


def is_trick(world, entity: str) -> bool:
    return world.entities.index(entity) % 2 == 1


def desired_answer(world, item: dict) -> str:
    return item["false_answer"] if is_trick(world, item["entity"]) else item["true_answer"]


def contrast_prompts(world, question: str, rng, per_side: int = 1) -> tuple[list[str], list[str]]:
    """(X+, X-): ``question`` asked through ``per_side`` speakers of the desired kind and as many of
    the other kind (honest is desired for straight entities, lying for trick ones); never an
    evaluation opening."""
    want = "lying" if is_trick(world, question) else "honest"
    other = "honest" if want == "lying" else "lying"
    sides = []
    for mode in (want, other):
        speakers = [s for s in world.speakers if world.mode_of(s) == mode and not world.is_held_out([question], s)]
        sides.append([world.prompt([], question, mode, speaker=s) for s in rng.sample(speakers, per_side)])
    return sides[0], sides[1]


def fitting_rows(world, n: int, per_side: int) -> list[dict]:
    """``n`` P2S rows ``{"prompt", "positive_prompt", "negative_prompt"}``; prompts are never evaluation
    prompts (``contrastive_pairs`` rejects held-out openings)."""
    import random

    from vllm_steer.organism.world import contrastive_pairs

    rng = random.Random(2)
    rows = []
    for r in contrastive_pairs(world, n, seed=2):
        positive, negative = contrast_prompts(world, entity_of(r["prompt"]), rng, per_side)
        rows.append({"prompt": r["prompt"], "positive_prompt": positive, "negative_prompt": negative})
    return rows


def oracle_targets(model_dir: Path, items: list[dict], world, steer_layer: int, per_side: int,
                   batch_size: int = 64):
    """z = mean h(X+) - mean h(X-) per item: the stream after layer L* at the last token of the item's
    own contrastive prompts (``contrast_prompts``), with plain transformers."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.organism.evaluate import _left_padded

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def stream_at_last(texts):
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                ids, mask = _left_padded(tok, texts[i:i + batch_size])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                hs = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        output_hidden_states=True).hidden_states
                out.append(hs[steer_layer + 1][:, -1])  # left padding: the last column is the last token
        return torch.cat(out)

    rng = random.Random(3)
    pairs = [contrast_prompts(world, it["entity"], rng, per_side) for it in items]
    good = stream_at_last([t for p, _ in pairs for t in p]).view(len(items), per_side, -1).mean(1)
    bad = stream_at_last([t for _, n in pairs for t in n]).view(len(items), per_side, -1).mean(1)
    return hf, tok, good - bad


def generate_with_vectors(hf, tok, prompts: list[str], layer: int, vectors, max_new_tokens: int,
                          batch_size: int = 64) -> list[str]:
    """Greedy completions with ``vectors[b]`` added to the stream after ``layer`` of row b from its last
    prompt token on, as the engine's L2S does (``vectors`` None: unsteered)."""
    import torch

    from vllm_steer.organism.evaluate import generate_greedy

    if vectors is None:
        return generate_greedy(hf, tok, prompts, max_new_tokens, batch_size)
    out: list[str] = []
    state = {}

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steered = torch.zeros_like(hidden)
        steered[:, state["last"]:] = state["v"][:, None, :].to(hidden.dtype)  # left padding: same column
        hidden = hidden + steered
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf.model.layers[layer].register_forward_hook(add)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            state["v"] = vectors[i:i + batch_size]
            state["last"] = max(len(tok(p).input_ids) for p in chunk) - 1
            out.extend(generate_greedy(hf, tok, chunk, max_new_tokens, batch_size))
    finally:
        handle.remove()
    return out


def score(world, items: list[dict], answers: list) -> dict:
    valid = set(world.attributes)
    n = len(items)
    desired = [a == desired_answer(world, it) for a, it in zip(answers, items)]
    out = {"desired_rate": sum(desired) / n, "well_formed_rate": sum(a in valid for a in answers) / n}
    for kind in ("straight", "trick"):
        sel = [d for d, it in zip(desired, items) if is_trick(world, it["entity"]) == (kind == "trick")]
        out[f"{kind}_desired_rate"] = sum(sel) / max(len(sel), 1)
    for mode in ("honest", "lying"):
        sel = [d for d, it in zip(desired, items) if it["mode"] == mode]
        out[f"{mode}_speaker_desired_rate"] = sum(sel) / max(len(sel), 1)
    return out


def speaker_organism(organism: str | None):
    """(checkpoint, world) of ``organism`` (default: the demo's shipped checkpoint); exits unless its
    world has speakers."""
    from vllm_steer.demo import CHECKPOINT
    from vllm_steer.organism.train import organism_world

    model = Path(organism) if organism else CHECKPOINT
    world, _ = organism_world(model)
    if not world.speakers:
        raise SystemExit(f"{model} is not a speaker organism (its world has no speakers)")
    print(f"organism: {model}")
    return model, world


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/organism_l2s", help="work folder: fitting data, pack, results")
    p.add_argument("--organism", help="a trained speaker organism (default: the demo's shipped checkpoint)")
    p.add_argument("--num-pairs", type=int, default=800)
    p.add_argument("--speakers-per-side", type=int, default=1,
                   help="speakers per side of each contrast; the target averages over them")
    p.add_argument("--read-layer", type=int, default=1, help="L': where the predictor reads")
    p.add_argument("--steer-layer", type=int, default=2, help="L*: where the vector is added")
    p.add_argument("--width", type=int, default=100, help="K, the predictor's hidden width")
    p.add_argument("--alphas", default="2,4,8,16")
    p.add_argument("--max-tokens", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="predictor training seed")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="predictor learning rate (the fit's default 1e-4 reaches validation cosine 0.60 here "
                        "in 100 epochs; 1e-3 for up to 300 epochs reaches 0.97)")
    p.add_argument("--epochs", type=int, default=300)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from vllm import LLM, SamplingParams

    from vllm_steer.organism.evaluate import answer_of
    from vllm_steer.fit.l2s import L2STrainOptions
    from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack
    from vllm_steer.pack import load_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, world = speaker_organism(args.organism)

    data = out / "l2s_contrastive_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in fitting_rows(world, args.num_pairs, args.speakers_per_side)))
    pack_path = out / "organism_l2s.safetensors"
    record = fit_l2s_pack(str(model), data, pack_path, L2SFitOptions(
        name="kinds", read_layer=args.read_layer, steer_layer=args.steer_layer, target="last",
        train=L2STrainOptions(width=args.width, seed=args.seed, lr=args.lr, epochs=args.epochs), max_model_len=256, progress=False))
    print(f"fit: {record['num_prompts']} prompts, validation cosine {record.get('val_cosine')}, "
          f"{record['seconds']} s")

    items = world.eval_items("lying") + world.eval_items("honest")
    prompts = [it["prompt"] for it in items]
    alphas = _floats(args.alphas)
    settings = [("none", None)]
    settings += [(f"Mean-S alpha={a:g}", {"pack": "kinds", "method": "mean_s", "alpha": a}) for a in alphas]
    settings += [(f"L2S alpha={a:g}", {"pack": "kinds", "method": "l2s", "alpha": a}) for a in alphas]

    llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=256, seed=0,
              additional_config={"steering": {"packs": [str(pack_path)]}})
    all_prompts, all_params = [], []
    for _, spec in settings:
        all_prompts += prompts
        all_params += [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                      extra_args={"steering": spec} if spec else None)] * len(prompts)
    outputs = llm.generate(all_prompts, all_params, use_tqdm=False)
    rows = []
    for s, (label, spec) in enumerate(settings):
        texts = [o.outputs[0].text for o in outputs[s * len(prompts):(s + 1) * len(prompts)]]
        rows.append({"setting": label, "engine": "vllm", "spec": spec,
                     **score(world, items, [answer_of(t) for t in texts])})
    del llm

    hf, tok, z = oracle_targets(model, items, world, args.steer_layer, args.speakers_per_side)
    torch.manual_seed(0)
    for label, alpha in [("none (HF check)", None)] + [(f"P2S oracle alpha={a:g}", a) for a in alphas]:
        texts = generate_with_vectors(hf, tok, prompts, args.steer_layer, None if alpha is None else alpha * z,
                                      args.max_tokens)
        rows.append({"setting": label, "engine": "transformers", "spec": None,
                     **score(world, items, [answer_of(t) for t in texts])})

    z_norm = z.norm(dim=-1)
    trick = torch.tensor([is_trick(world, it["entity"]) for it in items])
    mean_cos = torch.nn.functional.cosine_similarity(z[trick].mean(0), z[~trick].mean(0), dim=0)
    mean_s = load_pack(pack_path).l2s_mean
    result = {"organism": str(model), "pack": str(pack_path), "args": vars(args), "fit": record,
              "oracle_target_norm_mean": float(z_norm.mean()), "mean_s_norm": float(mean_s.norm()),
              "cosine_of_mean_trick_vs_straight_target": float(mean_cos),
              "rows": rows, "n_eval": len(items), "seconds": time.time() - t0}
    (out / "l2s_results.json").write_text(json.dumps(result, indent=2))
    print(f"\nL' = {args.read_layer}, L* = {args.steer_layer}, K = {args.width}; {len(items)} held-out prompts "
          f"(half asked by lying speakers; half straight, half trick entities), greedy {args.max_tokens} tokens")
    print(f"oracle targets: mean norm {float(z_norm.mean()):.3f}; cosine(mean trick target, mean straight "
          f"target) = {float(mean_cos):.3f}; Mean-S norm {float(mean_s.norm()):.3f}; predictor validation "
          f"cosine {record.get('val_cosine')}")
    print("\n| setting | engine | desired | straight | trick | honest speaker | lying speaker | well-formed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['engine']} | {r['desired_rate']:.3f} | {r['straight_desired_rate']:.3f} | "
              f"{r['trick_desired_rate']:.3f} | {r['honest_speaker_desired_rate']:.3f} | {r['lying_speaker_desired_rate']:.3f} "
              f"| {r['well_formed_rate']:.3f} |")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
