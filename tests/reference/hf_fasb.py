"""Independent reference for FASB (flexible activation steering with backtracking), plain HF + hooks.

Written from the method's description (design/methods.md, FASB section); shares no code with
``vllm_steer``. Float32 models, batch 1, greedy decoding, with a KV cache.

Pack (a dict of tensors, or a safetensors file holding them), K probed-and-steered heads:
``heads.layer`` [K] int, ``heads.head`` [K] int, ``heads.direction`` [K, D] unit vectors,
``heads.sigma`` [K], ``probes.weight`` [K, D], ``probes.bias`` [K]. Head k's activation ``a_k`` is
columns ``h*D:(h+1)*D`` of the *input* of layer l's ``self_attn.o_proj`` (D = head_dim).

Score of a position: ``p = mean_k sigmoid(w_k . a_k + b_k)``, each ``a_k`` read before this layer's
steering add (after the adds of earlier layers, if steering is on). Steering adds
``strength(pos) * sigma_k * direction_k`` to head k's slice at each steered position ``pos``.

Decoding loop of :func:`fasb_generate` (P = prompt length, s = ``backtrack``):

1. One forward per step: the prompt first, then one token at a time. The step's score ``p`` is taken
   at the forward's last input position (the newest token). The next token is the argmax of that
   position's logits; it is appended, and G = number of generated tokens now.
2. ``final`` = G >= max_tokens, or (not ignore_eos and token == eos_token_id).
   The step is *checked* when backtracks remain (count < max_backtracks) and (G >= min_tokens or
   final); ``min_tokens`` defaults to ``max(s, 1)``.
3. A checked step with ``p < threshold`` triggers: strength = alpha * (1 - p) (replaces any earlier
   one), keep = G - s if G > s else 0, the generated tokens are cut to ``keep``, count += 1,
   steer_from = P + keep - 1 (the last kept token; the last prompt token when keep == 0). The KV cache
   is cut to ``steer_from`` positions (earlier positions keep whatever KV they had) and the token at
   ``steer_from`` is fed again, steered; every position computed from then on is steered. A trigger
   never ends generation, except in the degenerate s == 0 case where the kept tokens already reach
   ``max_tokens`` or end with the EOS that stopped them: then there is nothing left to regenerate.
4. An unchecked or non-firing step ends generation when ``final``. An EOS that ends generation is
   kept in ``tokens`` (as vLLM reports it).

Strength per position (``strength=``; every position keeps the KV it was computed with, no recompute):

* ``"code"`` (default): every position computed after a trigger is steered with that trigger's
  strength alpha * (1 - p_trigger).
* ``"paper"`` (FASB paper, r = 1[p_undesired > beta] * p_undesired * alpha, p_undesired = 1 - p,
  beta = 1 - threshold, re-evaluated every step): the token fed again at ``steer_from`` gets
  alpha * (1 - p_trigger), as in "code". Each later forward computes one new position q with the
  strength assigned to q; its score p_q (read before the adds, as above) sets the strength of q + 1:
  alpha * (1 - p_q) if p_q < threshold else 0.0. A further check that fires (max_backtracks > 1) is a
  normal trigger (new steer_from at alpha * (1 - p)), and the rule goes on from there.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACK_KEYS = ("heads.layer", "heads.head", "heads.direction", "heads.sigma", "probes.weight", "probes.bias")


@dataclass
class FasbTrace:
    """What :func:`fasb_generate` did.

    ``tokens``: the final generated tokens. ``scores[i]``: the score of the i-th forward (one per
    forward, checked or not), taken at absolute position ``score_positions[i]``. ``triggers``: one
    dict per backtrack with ``generated`` (G when it fired), ``score``, ``strength`` (alpha * (1 - p)),
    ``keep`` and ``steer_from``. ``strengths``: {absolute position: strength it was last computed
    with} for every steered position of the final sequence (positions < the first steer_from are
    absent; a later trigger overwrites the positions it recomputes; 0.0 = computed unsteered after a
    trigger, "paper" mode only)."""

    tokens: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    score_positions: list[int] = field(default_factory=list)
    triggers: list[dict] = field(default_factory=list)
    strengths: dict[int, float] = field(default_factory=dict)


def load_pack(pack) -> dict[str, torch.Tensor]:
    """The six pack tensors (float32 / int64) from a dict or a safetensors path."""
    if isinstance(pack, (str, Path)):
        from safetensors.torch import load_file

        pack = load_file(str(pack))
    missing = [k for k in PACK_KEYS if k not in pack]
    if missing:
        raise KeyError(f"pack lacks {missing}")
    out = {k: torch.as_tensor(pack[k]) for k in PACK_KEYS}
    for k in ("heads.layer", "heads.head"):
        out[k] = out[k].to(torch.long)
    for k in ("heads.direction", "heads.sigma", "probes.weight", "probes.bias"):
        out[k] = out[k].to(torch.float32)
    return out


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@contextmanager
def _fasb_hooks(model, pack, state):
    """Pre-hooks on the o_proj of every layer the pack touches.

    ``state`` (mutated by the caller between forwards):
      ``offset``     absolute position of the forward's first input token,
      ``strengths``  {absolute position: strength} when not None (absent positions: unsteered); else
      ``strength``   one steering strength (0 = off) for every position >= ``steer_from``,
      ``steer_from`` first steered absolute position (None = none steered).
    Each position gets ``strength_of(position) * sigma_k * direction_k`` (see :func:`_strength_of`).
    The hooks fill ``state["probs"][k]`` with head k's P(desired) at every position of the forward
    (read before this layer's add)."""
    D = _head_dim(model)
    layers = pack["heads.layer"].tolist()
    heads = pack["heads.head"].tolist()
    by_layer: dict[int, list[int]] = {}
    for k, layer in enumerate(layers):
        by_layer.setdefault(layer, []).append(k)
    handles = []

    def make_hook(ks):
        def hook(module, args):
            x = args[0]  # [B, T, H*D]
            for k in ks:  # read every head of this layer first
                cols = slice(heads[k] * D, (heads[k] + 1) * D)
                a = x[0, :, cols].float()
                w = pack["probes.weight"][k].to(a.device)
                b = pack["probes.bias"][k].to(a.device)
                state["probs"][k] = torch.sigmoid(a @ w + b)
            T = x.shape[1]
            strengths = [_strength_of(state, state["offset"] + t) for t in range(T)]
            if not any(strengths):
                return None
            r = torch.tensor(strengths, dtype=torch.float32, device=x.device)
            mask = r != 0
            x = x.clone()
            for k in ks:
                cols = slice(heads[k] * D, (heads[k] + 1) * D)
                sigma = pack["heads.sigma"][k].to(x.device)
                direction = pack["heads.direction"][k].to(x.device)
                add = (r[mask, None] * sigma) * direction[None, :]  # [T_steered, D]
                x[:, mask, cols] = x[:, mask, cols] + add.to(x.dtype)
            return (x,) + tuple(args[1:])

        return hook

    try:
        for layer, ks in by_layer.items():
            o_proj = model.model.layers[layer].self_attn.o_proj
            handles.append(o_proj.register_forward_pre_hook(make_hook(ks)))
        yield
    finally:
        for h in handles:
            h.remove()


def _new_state() -> dict:
    return {"offset": 0, "strength": 0.0, "steer_from": None, "strengths": None, "probs": {}}


def _strength_of(state, pos: int) -> float:
    """The steering strength of absolute position ``pos`` (0.0 = unsteered)."""
    if state.get("strengths") is not None:
        return float(state["strengths"].get(pos, 0.0))
    if not state["strength"] or state["steer_from"] is None or pos < state["steer_from"]:
        return 0.0
    return float(state["strength"])


def _mean_probs(state, K: int) -> torch.Tensor:
    """Per-position score of the last forward: mean over the K heads, shape [T]."""
    return torch.stack([state["probs"][k] for k in range(K)]).mean(dim=0)


def _truncate_cache(cache, n: int):
    """The cache cut to its first ``n`` positions (a fresh cache when n == 0)."""
    from transformers import DynamicCache

    if n == 0:
        return DynamicCache()
    extra = cache.get_seq_length() - n
    if extra < 0:
        raise AssertionError(f"cache holds {cache.get_seq_length()} positions, asked to keep {n}")
    if extra > 0:
        cache.crop(-extra)  # a negative argument removes that many from the end (old and new API)
    assert cache.get_seq_length() == n
    return cache


@torch.no_grad()
def fasb_generate(model, prompt_ids, pack, *, alpha, threshold=0.5, backtrack=10, min_tokens=None,
                  max_backtracks=1, max_tokens, eos_token_id=None, ignore_eos=True,
                  strength="code", extra_hooks=None) -> FasbTrace:
    """FASB greedy decoding with a KV cache (semantics in the module docstring).

    ``strength``: "code" (one strength per trigger) or "paper" (re-evaluated every step).
    ``extra_hooks(state)``: a context manager installing more steering hooks (a composition's other
    members) after FASB's own, reading positions from ``state["offset"]``: FASB's probes read each
    layer before their adds too."""
    from transformers import DynamicCache

    if strength not in ("code", "paper"):
        raise ValueError(f"strength must be 'code' or 'paper', got {strength!r}")
    mode = strength  # the name ``strength`` is reused below for a trigger's value

    pack = load_pack(pack)
    K = int(pack["heads.layer"].numel())
    prompt = [int(t) for t in prompt_ids]
    P = len(prompt)
    if P < 1 or max_tokens < 1 or backtrack < 0:
        raise ValueError("need a non-empty prompt, max_tokens >= 1 and backtrack >= 0")
    s = int(backtrack)
    first_check = max(s, 1) if min_tokens is None else int(min_tokens)
    stop_on_eos = (not ignore_eos) and eos_token_id is not None
    device = model.device

    trace = FasbTrace()
    state = _new_state()
    state["strengths"] = trace.strengths  # filled before each forward for the positions it computes
    trigger_strength = None  # strength of the trigger in force (None before the first)
    cache = DynamicCache()
    feed = prompt
    count = 0
    with _fasb_hooks(model, pack, state), (extra_hooks(state) if extra_hooks is not None else nullcontext()):
        while True:
            out = model(input_ids=torch.tensor([feed], device=device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            p = float(_mean_probs(state, K)[-1])
            trace.scores.append(p)
            trace.score_positions.append(state["offset"] + len(feed) - 1)
            state["offset"] += len(feed)

            token = int(out.logits[0, -1].argmax())
            trace.tokens.append(token)
            G = len(trace.tokens)
            is_eos = stop_on_eos and token == eos_token_id
            final = G >= max_tokens or is_eos

            checked = count < max_backtracks and (G >= first_check or final)
            if checked and p < threshold:
                keep = G - s if G > s else 0
                steer_from = P + keep - 1
                strength = alpha * (1.0 - p)
                count += 1
                trace.triggers.append({"generated": G, "score": p, "strength": strength, "keep": keep,
                                       "steer_from": steer_from})
                del trace.tokens[keep:]
                if keep >= max_tokens or (stop_on_eos and keep > 0 and trace.tokens[-1] == eos_token_id):
                    break  # s == 0 edge: nothing left to regenerate
                state["strength"], state["steer_from"] = strength, steer_from
                trigger_strength = strength
                for pos in [q for q in trace.strengths if q >= steer_from]:
                    del trace.strengths[pos]  # recomputed below (and overwritten)
                trace.strengths[steer_from] = strength
                cache = _truncate_cache(cache, steer_from)
                state["offset"] = steer_from
                feed = [(prompt + trace.tokens)[steer_from]]
                continue
            if final:
                break
            if trigger_strength is not None:  # strength of the next position, state["offset"]
                if mode == "code":
                    nxt = trigger_strength
                else:
                    nxt = alpha * (1.0 - p) if p < threshold else 0.0
                trace.strengths[state["offset"]] = nxt
            feed = [token]
    return trace


def truthfulqa_answer(generated_text: str) -> str:
    """The answer FASB's released TruthfulQA script keeps from a generation whose prompt ends at the
    question (``"...\\n\\nQ: {question}"``; the model writes ``"\\nA:"`` itself), all ``max_new_token``
    tokens decoded: strip, cut at the first "Q:", strip, then the piece after the first "A:" (up to a
    second "A:"), stripped; the cut text itself when there is no "A:"."""
    text = generated_text.strip().split("Q:")[0].strip()
    try:
        text = text.split("A:")[1].strip()
    except IndexError:
        pass
    return text


@torch.no_grad()
def probe_scores_at(model, token_ids, pack) -> list[float]:
    """The unsteered score at every position of ``token_ids`` (one forward, no cache, no steering)."""
    pack = load_pack(pack)
    state = _new_state()
    with _fasb_hooks(model, pack, state):
        model(input_ids=torch.tensor([[int(t) for t in token_ids]], device=model.device), use_cache=False)
    return [float(v) for v in _mean_probs(state, int(pack["heads.layer"].numel()))]


@torch.no_grad()
def fasb_mc_logprob(model, prompt_ids, answer_ids, pack, *, alpha, threshold, backtrack, skip_first=4,
                    score_from=0):
    """TruthfulQA-MC score of ``answer_ids`` after ``prompt_ids`` under FASB: ``(score, triggered_at)``.

    Written from the rule of FASB's released MC loop. A position is an index into ``prompt + answer``
    (length T); the score p(pos) is read from the activations computed for token ``pos``.

    1. One unsteered forward (no cache) over ``prompt + answer``; p(pos) at every position, as in
       :func:`probe_scores_at`.
    2. start = len(prompt) + skip_first. Walk pos = start, start + 1, ..., T - 1. The first
       ``backtrack`` positions of the walk are passed over, except the sequence's last position
       T - 1, which is always looked at; every other position is looked at. The first position
       looked at with p(pos) < threshold triggers (``triggered_at`` = pos; None when nothing fires).
       When T - 1 < start the walk is empty: nothing is looked at.
    3. On a trigger, a second forward (no cache) over the whole sequence adds
       alpha * (1 - p(pos)) * sigma_k * direction_k to every head at every position
       >= max(start, pos - backtrack).
    4. score = sum over t in [len(prompt) + score_from, T) of log_softmax(logits[t - 1])[token t],
       from the last forward run (the steered one when it fired).
    """
    pack = load_pack(pack)
    K = int(pack["heads.layer"].numel())
    prompt = [int(t) for t in prompt_ids]
    ids = prompt + [int(t) for t in answer_ids]
    if not prompt or len(ids) == len(prompt):
        raise ValueError("need a non-empty prompt and a non-empty answer")
    if not 0 <= score_from < len(ids) - len(prompt):
        raise ValueError("score_from must leave at least one answer token scored")
    T = len(ids)
    x = torch.tensor([ids], device=model.device)
    state = _new_state()
    start = len(prompt) + skip_first
    triggered_at = None
    with _fasb_hooks(model, pack, state):
        logits = model(input_ids=x, use_cache=False).logits[0]
        scores = _mean_probs(state, K)
        passed_over = 0
        for pos in range(start, T):
            if pos != T - 1 and passed_over < backtrack:
                passed_over += 1
                continue
            p = float(scores[pos])
            if p < threshold:
                triggered_at = pos
                state["strength"] = alpha * (1.0 - p)
                state["steer_from"] = max(start, pos - backtrack)
                state["offset"] = 0
                logits = model(input_ids=x, use_cache=False).logits[0]
                break
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    first = len(prompt) + score_from
    targets = torch.tensor(ids[first:], device=logits.device)
    rows = torch.arange(first - 1, T - 1, device=logits.device)
    return float(logprobs[rows, targets].sum()), triggered_at
