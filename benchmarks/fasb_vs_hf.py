"""FASB generation speed: vllm-steer in vLLM vs two plain-transformers implementations, one run.

One small random-weight Llama checkpoint (built offline with ``cached_tiny_checkpoint``: default
hidden 256, 4 layers, 4 heads, 2 KV heads, vocab 512, float32) is loaded by all three; the same
equal-length random prompts, the same ``max_tokens``, greedy decoding, the same pack and FASB knobs
(defaults are FASB's released argparse defaults where they exist: alpha 15, threshold 0.5, s = 10).

Rows (tokens/s = delivered tokens, i.e. the final generated tokens, per wall-clock second):

  vllm       vllm-steer: one ``LLM.generate`` of ``--num-requests`` requests (default 64) at
             ``max_num_seqs`` = the number of requests, method "fasb" in each request's spec.
  hf_ref     FASB's reference loop as its authors ran it: batch 1, no KV cache, every step re-runs
             the whole sequence; forward pre-hooks on ``o_proj`` read the probes at the newest
             token; after the (single) trigger the last s tokens are dropped and steering
             (alpha * (1 - p) * sigma * direction on the pack's heads) is added at the last position
             only of every later forward, so kept tokens are recomputed unsteered each step (the
             reference code's quirk). Fewer requests (``--hf-ref-requests``); it is slow.
  hf_batched the same monitoring and backtrack logic, batched, with a KV cache (DynamicCache),
             batch = all requests, equal-length prompts (no padding). Rows that share a length
             form a group; every step runs one forward per group. When rows fire, they leave their
             group (``batch_select_indices`` on the cache) and form a new group that recomputes
             its rows from scratch: one forward over prompt + kept tokens with a fresh cache,
             steered at every position >= steer_from (the last kept token), then decodes on,
             steered, at the fixed strength. This is vllm-steer's semantics (steered KV from the
             last kept token on) with a full re-prefill instead of a prefix-cache hit.

The probes (``--probes``): "constant" (default) = weight 0, bias logit(0.3), so every request fires
at its first check (G = min_tokens) and the three implementations do the same work; "random" =
random probes (firing then depends on the tokens). The run also reports how often the
implementations' tokens agree with vllm's (hf_batched implements the same semantics, so it should
agree up to float rounding; hf_ref steers differently after a trigger).

For context, a fourth row runs the same prompts through the same vLLM engine without a steering
spec (plain greedy generation, no FASB): vLLM's own speed on this model.

The HF rows run in this process with torch's default thread count; vLLM's engine process is idle
meanwhile. vllm, hf_batched and the unsteered vLLM rounds are interleaved; hf_ref runs once, after them. Medians.

    python benchmarks/fasb_vs_hf.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


# ---- the pack -------------------------------------------------------------------------------------

def make_pack(shape, name: str, k: int, probes: str, constant_p: float, seed: int):
    from vllm_steer.pack.synthetic import random_pack, with_constant_probes

    base = random_pack(shape, name, num_heads_selected=k, with_probes=True, seed=seed)
    if probes == "random":
        return base
    return with_constant_probes(base, constant_p)


# ---- HF hooks: probe scores at the newest position, per-row / per-position steering ---------------

class ProbeSteerHooks:
    """Forward pre-hooks on the ``o_proj`` of every layer the pack touches.

    Before each forward the caller sets ``self.steer``: None (no steering) or a [B, T] float tensor of
    strengths (0 = unsteered) for the forward's positions. After it, ``self.score()`` is the mean over
    the K heads of sigmoid(w . a + b) at the forward's last position, per row ([B]); each head is read
    before its layer's steering add."""

    def __init__(self, model, pack):
        import torch

        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = pack.head_layers.tolist()
        self.k = len(layers)
        self.steer = None
        self._probs: list = []
        self._handles = []
        for layer in sorted(set(layers)):
            idx = [i for i, l in enumerate(layers) if l == layer]
            heads = pack.head_indices[idx]
            w = pack.probe_weights[idx]  # [n, D]
            b = pack.probe_biases[idx]  # [n]
            add = pack.head_sigmas[idx, None] * pack.head_directions[idx]  # [n, D]: unit-alpha ITI rows
            module = model.model.layers[layer].self_attn.o_proj
            self._handles.append(module.register_forward_pre_hook(self._make_hook(heads, w, b, add)))
        self._torch = torch

    def _make_hook(self, heads, w, b, add):
        import torch

        def hook(module, args):
            x = args[0]
            B, T, _ = x.shape
            xs = x.view(B, T, self.num_heads, self.head_dim)
            a = xs[:, -1, heads, :]  # [B, n, D]
            self._probs.append(torch.sigmoid((a * w).sum(-1) + b))  # [B, n]
            if self.steer is None:
                return None
            x = x.clone()
            xs = x.view(B, T, self.num_heads, self.head_dim)
            xs[:, :, heads, :] += self.steer[:, :, None, None] * add[None, None]
            return (x,) + tuple(args[1:])

        return hook

    def start(self, steer) -> None:
        self.steer = steer
        self._probs = []

    def score(self):
        return self._torch.cat(self._probs, dim=1).mean(dim=1)  # [B]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---- HF (a): the reference loop, batch 1, no KV cache ----------------------------------------------

def hf_reference(model, hooks, prompt: list[int], knobs: dict, max_tokens: int) -> dict:
    import torch

    s, first_check = knobs["backtrack"], knobs["first_check"]
    generated: list[int] = []
    strength, fired, recomputed = 0.0, False, 0
    while True:
        seq = prompt + generated
        steer = None
        if fired:  # steer only the newest position of the re-run sequence
            steer = torch.zeros(1, len(seq))
            steer[0, -1] = strength
        hooks.start(steer)
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        p = float(hooks.score()[0])
        generated.append(int(logits.argmax()))
        G = len(generated)
        final = G >= max_tokens
        if not fired and (G >= first_check or final) and p < knobs["threshold"]:
            keep = G - s if G > s else 0
            if not (final and keep == G):
                fired, strength = True, knobs["alpha"] * (1.0 - p)
                recomputed += G - keep
                del generated[keep:]
                continue
        if final:
            return {"tokens": generated, "fired": fired, "recomputed": recomputed}


# ---- HF (b): batched, KV cache, per-row monitoring and backtracking --------------------------------

class _Group:
    """Rows of equal length decoding together with one DynamicCache."""

    def __init__(self, rows, feed, steer_from, strength, checking, cache):
        self.rows = rows  # request indices
        self.feed = feed  # [B, T] tokens to feed next
        self.steer_from = steer_from  # first steered absolute position (None = unsteered)
        self.strength = strength  # [B] strengths (used when steer_from is not None)
        self.checking = checking
        self.cache = cache
        self.offset = 0  # absolute position of feed's first column


def hf_batched(model, hooks, prompts: list[list[int]], knobs: dict, max_tokens: int) -> dict:
    import torch
    from transformers import DynamicCache

    s, first_check, thr = knobs["backtrack"], knobs["first_check"], knobs["threshold"]
    n, P = len(prompts), len(prompts[0])
    assert all(len(p) == P for p in prompts), "hf_batched needs equal-length prompts"
    generated: list[list[int]] = [[] for _ in range(n)]
    fired = [False] * n
    recomputed = 0
    forwards = 0
    groups = [_Group(list(range(n)), torch.tensor(prompts), None, None, True, DynamicCache())]
    while groups:
        next_groups = []
        for g in groups:
            B, T = g.feed.shape
            steer = None
            if g.steer_from is not None:
                pos = torch.arange(g.offset, g.offset + T)
                steer = g.strength[:, None] * (pos >= g.steer_from).float()[None, :]
            hooks.start(steer)
            out = model(input_ids=g.feed, past_key_values=g.cache, use_cache=True)
            forwards += 1
            g.cache = out.past_key_values
            g.offset += T
            p = hooks.score()
            tokens = out.logits[:, -1].argmax(-1).tolist()
            for r, t in zip(g.rows, tokens):
                generated[r].append(t)
            G = len(generated[g.rows[0]])
            final = G >= max_tokens
            fire_idx = []
            if g.checking and (G >= first_check or final):
                keep = G - s if G > s else 0
                if not (final and keep == G):
                    fire_idx = [i for i in range(B) if float(p[i]) < thr]
            if fire_idx:
                fired_rows = [g.rows[i] for i in fire_idx]
                for r in fired_rows:
                    del generated[r][keep:]
                    fired[r] = True
                recomputed += len(fired_rows) * (G - keep)
                seqs = torch.tensor([prompts[r] + generated[r] for r in fired_rows])
                strength = knobs["alpha"] * (1.0 - p[fire_idx].float())
                # max_backtracks = 1: the new group is not checked again
                next_groups.append(_Group(fired_rows, seqs, P + keep - 1, strength, False, DynamicCache()))
                stay = [i for i in range(B) if i not in set(fire_idx)]
                if not stay:
                    continue
                g.cache.batch_select_indices(torch.tensor(stay))
                g.rows = [g.rows[i] for i in stay]
                if g.steer_from is not None:
                    g.strength = g.strength[stay]
                tokens = [tokens[i] for i in stay]
            if final:
                continue
            g.feed = torch.tensor(tokens)[:, None]
            next_groups.append(g)
        groups = next_groups
    return {"tokens": generated, "fired": fired, "recomputed": recomputed, "forwards": forwards}


# ---- main ---------------------------------------------------------------------------------------

def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical sequences, share of identical tokens position by position)."""
    same = sum(x == y for x, y in zip(a, b))
    pos = sum(sum(u == v for u, v in zip(x, y)) for x, y in zip(a, b))
    total = sum(max(len(x), len(y)) for x, y in zip(a, b))
    return same / len(a), pos / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64, help="vllm and hf_batched batch size")
    ap.add_argument("--hf-ref-requests", type=int, default=16, help="requests run by the batch-1 reference loop")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("-k", "--selected-heads", type=int, default=8)
    ap.add_argument("--probes", choices=["constant", "random"], default="constant")
    ap.add_argument("--constant-p", type=float, default=0.3)
    ap.add_argument("--alpha", type=float, default=15.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--backtrack", type=int, default=10)
    ap.add_argument("--min-tokens", type=int, default=None, help="default max(backtrack, 1)")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--cache-root", help="where the checkpoint is cached (default ~/.cache/vllm-steer/models)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import random
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
    from vllm_steer.pack import save_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    t_start = time.perf_counter()
    ckpt = cached_tiny_checkpoint(
        "llama", cache_root=args.cache_root, hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
    )
    shape = shape_of_checkpoint(ckpt)
    pack = make_pack(shape, "fasb", args.selected_heads, args.probes, args.constant_p, seed=0)
    pack_path = save_pack(Path(tempfile.mkdtemp(prefix="vllm-steer-fasb-hf-")) / "fasb.safetensors", pack)

    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    knobs = {"alpha": args.alpha, "threshold": args.threshold, "backtrack": args.backtrack,
             "first_check": args.min_tokens if args.min_tokens is not None else max(args.backtrack, 1)}
    spec = {"pack": "fasb", "method": "fasb", "alpha": args.alpha, "threshold": args.threshold,
            "backtrack": args.backtrack, "max_backtracks": 1}
    if args.min_tokens is not None:
        spec["min_tokens"] = args.min_tokens
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            extra_args={"steering": spec})

    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=args.prompt_len + args.max_tokens + 8,
              max_num_seqs=args.num_requests, max_num_batched_tokens=max(2048, args.num_requests * 2),
              seed=0, enforce_eager=args.enforce_eager,
              additional_config={"steering": {"packs": [str(pack_path)]}})
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    hooks = ProbeSteerHooks(hf, pack)
    vllm_inputs = [{"prompt_token_ids": p} for p in prompts]

    with torch.no_grad():  # warm-up
        llm.generate(vllm_inputs[:4], params, use_tqdm=False)
        hf_batched(hf, hooks, prompts[:4], knobs, 4)
        hf_reference(hf, hooks, prompts[0], knobs, 2)

    delivered = args.num_requests * args.max_tokens
    plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {"vllm": [], "hf_batched": [], "vllm_unsteered": []}
    with torch.no_grad():
        for r in range(args.rounds):
            t0 = time.perf_counter()
            outs = llm.generate(vllm_inputs, plain, use_tqdm=False)
            el = time.perf_counter() - t0
            assert sum(len(o.outputs[0].token_ids) for o in outs) == delivered
            rates["vllm_unsteered"].append(delivered / el)
            print(f"round {r} vllm_unsteered {delivered / el:9.1f} tok/s ({el:.2f} s)", flush=True)

            t0 = time.perf_counter()
            outs = llm.generate(vllm_inputs, params, use_tqdm=False)
            el = time.perf_counter() - t0
            vllm_tokens = [list(o.outputs[0].token_ids) for o in outs]
            assert sum(map(len, vllm_tokens)) == delivered
            rates["vllm"].append(delivered / el)
            print(f"round {r} vllm       {delivered / el:9.1f} tok/s ({el:.2f} s)", flush=True)

            t0 = time.perf_counter()
            hb = hf_batched(hf, hooks, prompts, knobs, args.max_tokens)
            el = time.perf_counter() - t0
            assert sum(map(len, hb["tokens"])) == delivered
            rates["hf_batched"].append(delivered / el)
            print(f"round {r} hf_batched {delivered / el:9.1f} tok/s ({el:.2f} s)", flush=True)

        n_ref = min(args.hf_ref_requests, args.num_requests)
        t0 = time.perf_counter()
        ref = [hf_reference(hf, hooks, p, knobs, args.max_tokens) for p in prompts[:n_ref]]
        el = time.perf_counter() - t0
    ref_delivered = n_ref * args.max_tokens
    rates["hf_ref"] = [ref_delivered / el]
    print(f"hf_ref     {ref_delivered / el:9.1f} tok/s ({el:.2f} s, {n_ref} requests)", flush=True)
    hooks.remove()

    med = {k: statistics.median(v) for k, v in rates.items()}
    same_b, pos_b = _agreement(vllm_tokens, hb["tokens"])
    same_a, pos_a = _agreement(vllm_tokens[:n_ref], [x["tokens"] for x in ref])
    if args.probes == "constant":
        g_fire = min(knobs["first_check"], args.max_tokens)
        vllm_fired = args.num_requests if args.constant_p < args.threshold else 0
        keep = g_fire - args.backtrack if g_fire > args.backtrack else 0
        vllm_recomputed = vllm_fired * (g_fire - keep)
    else:
        vllm_fired = vllm_recomputed = None
    fired = {"vllm": vllm_fired, "hf_batched": sum(hb["fired"]), "hf_ref": sum(x["fired"] for x in ref)}
    recomputed = {"vllm": vllm_recomputed, "hf_batched": hb["recomputed"], "hf_ref": sum(x["recomputed"] for x in ref)}
    fired["vllm_unsteered"], recomputed["vllm_unsteered"] = 0, 0
    n_of = {"vllm": args.num_requests, "hf_batched": args.num_requests, "hf_ref": n_ref,
            "vllm_unsteered": args.num_requests}
    batch_of = {"vllm": args.num_requests, "hf_batched": args.num_requests, "hf_ref": 1,
                "vllm_unsteered": args.num_requests}
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "args": vars(args), "checkpoint": str(ckpt), "tokens_per_s": med,
        "vllm_over": {k: med["vllm"] / med[k] for k in med},
        "fired": fired, "recomputed_tokens": recomputed, "hf_batched_forwards": hb["forwards"],
        "agreement_with_vllm": {"hf_batched": {"sequences": same_b, "tokens": pos_b},
                                "hf_ref": {"sequences": same_a, "tokens": pos_a}},
        "all_rounds": rates, "seconds": time.perf_counter() - t_start,
    }
    print(f"\nmodel: random llama hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} KV), vocab {args.vocab_size}, float32; prompts {args.prompt_len} tokens, "
          f"max_tokens {args.max_tokens}, greedy; FASB alpha {args.alpha:g}, threshold {args.threshold:g}, "
          f"s={args.backtrack}, first check at G={knobs['first_check']}, K={args.selected_heads}, "
          f"{args.probes} probes")
    print("\n| implementation | requests | batch | fired | recomputed tokens | delivered tokens/s (median) "
          "| vllm / this |\n|---|---|---|---|---|---|---|")
    label = {"vllm": "vllm-steer FASB", "hf_batched": "HF batched + KV cache",
             "hf_ref": "HF reference loop (no cache)",
             "vllm_unsteered": "(context) vLLM, same engine, no steering spec"}
    for k in ("vllm", "hf_batched", "hf_ref", "vllm_unsteered"):
        rc = "n/a" if recomputed[k] is None else recomputed[k]
        fi = "n/a" if fired[k] is None else fired[k]
        print(f"| {label[k]} | {n_of[k]} | {batch_of[k]} | {fi} | {rc} | {med[k]:.1f} | {med['vllm'] / med[k]:.2f} |")
    print(f"\n(vllm fired/recomputed: from the spec, constant probes; HF: counted.) Token agreement with vllm: "
          f"hf_batched {same_b:.3f} of sequences identical, {pos_b:.3f} of tokens; hf_ref {same_a:.3f} of "
          f"sequences, {pos_a:.3f} of tokens (hf_ref steers only the newest position after a trigger).")
    print("per round: " + "; ".join(f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in rates.items()))
    print(f"({result['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
