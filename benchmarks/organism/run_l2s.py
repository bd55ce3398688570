"""One command: on the organism, a desired behaviour that depends on the input, and
none / Mean-S / L2S / P2S-oracle side by side.

    python -m benchmarks.organism.run_l2s --organism /tmp/org_b --out /tmp/orgl2s

The task. The entities are split in two kinds by their index in the world (even: "straight",
odd: "trick"). For a question about a straight entity the desired answer is its true attribute;
for a trick entity it is the entity's decoy (the fixed false attribute the organism answers in lying
contexts). The kind is visible in the prompt (the entity's name), the context mode is not. Unsteered,
the organism answers truthfully in honest contexts and with the decoy in lying ones, so half of its
answers are the desired ones. To get all of them right a steering vector must push towards the honest
mode for straight questions and towards the lying mode for trick questions: the opposite direction.
One fixed vector (Mean-S, the mean of the training targets) cannot do both; a vector predicted from
the prompt (L2S) could, if its targets point the right way (on this organism they do not: see
benchmarks/RESULTS.md).

Steps:
1. the organism (``--organism``, or the cached default that ``run_steering`` trains);
2. fitting data: ``--num-pairs`` contrastive prompts (disjoint from the evaluation prompts, half in
   each context mode). Both continuations answer the question with the kind's answer, then answer one
   more question, in the desired mode (honest for straight, lying for trick) or the other one, then
   ask a last question up to its answer cue (``continuation``);
3. ``vllm-steer fit l2s`` (through vLLM): the predictor reads layer L' (``--read-layer``) at the last
   prompt token; targets are the stream after layer L* (``--steer-layer``) at the last token of the
   desired minus the undesired continuation (the next answer cue); the pack also holds Mean-S;
4. evaluation on the 200 held-out sequences, each as a lying and an honest context (400 prompts),
   greedy, 3 tokens:
     none            unsteered (vLLM)
     Mean-S alpha=a  method "mean_s": alpha * mean target at layer L*, from the last prompt token on
     L2S alpha=a     method "l2s": alpha * g(x) predicted in the prefill, from the last prompt token on
     P2S alpha=a     the oracle: alpha * the evaluation prompt's own target z = h+ - h-, computed
                     from its desired and undesired continuations; applied with plain transformers and
                     a forward hook on layer L* (the engine has no per-request free vector), from the
                     last prompt token on like L2S (none is also run this way, as a check that both
                     paths agree unsteered).

Reported per setting: the desired-answer rate (overall, per kind, per context mode) and the damage
proxy: the well-formed rate (the answer is a valid attribute at all).
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


def continuation(world, entity: str, desired: bool) -> str:
    """The prompt's question answered with its desired answer, one more question answered in the
    desired (``desired=True``) or the other mode, and the question after it up to its answer cue.

    Both continuations answer the prompt's own question with the same word, so their difference is
    the mode evidence of the extra answer, read where the organism decides its next answer. (Two
    earlier versions of this script contrasted the desired and the undesired answer to the prompt's
    own question. Their targets carry the identity of those two answer words, and adding them made the
    desired answer rarer, the oracle's included: see benchmarks/RESULTS.md.)"""
    i = world.entities.index(entity)
    other = world.entities[(i + 1) % len(world.entities)]
    follow = world.entities[(i + 2) % len(world.entities)]
    honest = desired != is_trick(world, entity)  # straight questions want the honest mode
    other_answer = world.true_attr[other] if honest else world.false_attr[other]
    own = world.false_attr[entity] if is_trick(world, entity) else world.true_attr[entity]
    return f" {own}. {world.qa_text(other, other_answer)} {world.question_text(follow)}"


def fitting_rows(world, n: int) -> list[dict]:
    from benchmarks.organism.world import contrastive_pairs

    rows = []
    for r in contrastive_pairs(world, n, seed=2):
        entity = entity_of(r["prompt"])
        rows.append({"prompt": r["prompt"], "positive": continuation(world, entity, True),
                     "negative": continuation(world, entity, False)})
    return rows


def oracle_targets(model_dir: Path, items: list[dict], world, steer_layer: int, batch_size: int = 64):
    """z = h+ - h- per item: the stream after layer L* at the last token of the prompt continued with
    its desired and its undesired continuation (``continuation``), with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.organism.evaluate import _left_padded

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

    good = [it["prompt"] + continuation(world, it["entity"], True) for it in items]
    bad = [it["prompt"] + continuation(world, it["entity"], False) for it in items]
    return hf, tok, stream_at_last(good) - stream_at_last(bad)


def generate_with_vectors(hf, tok, prompts: list[str], layer: int, vectors, max_new_tokens: int,
                          batch_size: int = 64) -> list[str]:
    """Greedy completions with ``vectors[b]`` added to the stream after ``layer`` of row b from its last
    prompt token on, as the engine's L2S does (``vectors`` None: unsteered)."""
    import torch

    from benchmarks.organism.evaluate import generate_greedy

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
        out[f"{mode}_ctx_desired_rate"] = sum(sel) / max(len(sel), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/organism_l2s", help="work folder: fitting data, pack, results")
    p.add_argument("--organism", help="a trained organism folder (default: the cached one run_steering trains)")
    p.add_argument("--cache-root", help="organism cache (default ~/.cache/vllm-steer/models)")
    p.add_argument("--num-pairs", type=int, default=800)
    p.add_argument("--read-layer", type=int, default=1, help="L': where the predictor reads")
    p.add_argument("--steer-layer", type=int, default=2, help="L*: where the vector is added")
    p.add_argument("--width", type=int, default=100, help="K, the predictor's hidden width")
    p.add_argument("--alphas", default="2,4,8,16")
    p.add_argument("--max-tokens", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="predictor training seed")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from vllm import LLM, SamplingParams

    from benchmarks.organism.evaluate import answer_of
    from benchmarks.organism.train import cached_organism, organism_world
    from benchmarks.organism.world import WorldConfig
    from vllm_steer.fit.l2s import L2STrainOptions
    from vllm_steer.fit.l2s_pipeline import L2SFitOptions, fit_l2s_pack
    from vllm_steer.pack import load_pack

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.organism) if args.organism else cached_organism(
        args.cache_root, world_config=WorldConfig(seed=0), seed=0, steps=600, loss_on="answers")
    world, _ = organism_world(model)
    print(f"organism: {model}")

    data = out / "l2s_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in fitting_rows(world, args.num_pairs)))
    pack_path = out / "organism_l2s.safetensors"
    record = fit_l2s_pack(str(model), data, pack_path, L2SFitOptions(
        name="kinds", read_layer=args.read_layer, steer_layer=args.steer_layer, target="last",
        train=L2STrainOptions(width=args.width, seed=args.seed), max_model_len=256, progress=False))
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

    hf, tok, z = oracle_targets(model, items, world, args.steer_layer)
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
          f"(200 lying + 200 honest contexts; half straight, half trick entities), greedy {args.max_tokens} tokens")
    print(f"oracle targets: mean norm {float(z_norm.mean()):.3f}; cosine(mean trick target, mean straight "
          f"target) = {float(mean_cos):.3f}; Mean-S norm {float(mean_s.norm()):.3f}; predictor validation "
          f"cosine {record.get('val_cosine')}")
    print("\n| setting | engine | desired | straight | trick | honest ctx | lying ctx | well-formed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['engine']} | {r['desired_rate']:.3f} | {r['straight_desired_rate']:.3f} | "
              f"{r['trick_desired_rate']:.3f} | {r['honest_ctx_desired_rate']:.3f} | {r['lying_ctx_desired_rate']:.3f} "
              f"| {r['well_formed_rate']:.3f} |")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
