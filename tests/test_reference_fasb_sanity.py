"""Sanity checks for the FASB reference (``tests/reference/hf_fasb.py``) on a tiny llama, no vLLM.

Probes with zero weights make the score a known constant sigmoid(bias), so the trigger schedule is
known in advance; random probes check the score bookkeeping; an explicit no-cache forward with its
own hook checks the steered continuation (and so the KV-cache truncation).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts
from reference.hf_fasb import fasb_generate, fasb_mc_logprob, load_pack, probe_scores_at

MAX = 10


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32).eval()


def head_dim(model):
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def make_pack(model, seed=0, picks=None, const_p=None):
    """A random pack; ``const_p`` zeroes the probe weights so every score equals ``const_p``."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    picks = picks or [(0, 1), (1, 0), (2, cfg.num_attention_heads - 1), (cfg.num_hidden_layers - 1, 2)]
    K, D = len(picks), head_dim(model)
    direction = torch.randn(K, D, generator=gen)
    pack = {
        "heads.layer": torch.tensor([l for l, _ in picks]),
        "heads.head": torch.tensor([h for _, h in picks]),
        "heads.direction": direction / direction.norm(dim=1, keepdim=True),
        "heads.sigma": 0.5 + torch.rand(K, generator=gen),
        "probes.weight": torch.randn(K, D, generator=gen),
        "probes.bias": 0.1 * torch.randn(K, generator=gen),
    }
    if const_p is not None:
        pack["probes.weight"].zero_()
        pack["probes.bias"].fill_(math.log(const_p / (1 - const_p)))
    return pack


def plain_greedy(model, prompt, n):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=cfg)[0, len(prompt):].tolist()


@torch.no_grad()
def manual_logits(model, ids, pack, steer):
    """No-cache forward over ``ids`` with an independent hook adding strength * sigma_k * theta_k at
    each position in ``steer`` = {position: strength}."""
    D = head_dim(model)
    handles = []
    for k in range(len(pack["heads.layer"])):
        layer, head = int(pack["heads.layer"][k]), int(pack["heads.head"][k])
        vec = pack["heads.sigma"][k] * pack["heads.direction"][k]

        def hook(module, args, head=head, vec=vec):
            x = args[0].clone()
            for pos, strength in steer.items():
                x[0, pos, head * D:(head + 1) * D] += strength * vec
            return (x,)

        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()


PROMPTS = random_prompts(3, 512, seed=7, min_len=4, max_len=12)


# (a) a threshold of 0 never fires: plain greedy decoding
def test_never_fires_is_plain_greedy(model):
    pack = make_pack(model)
    for prompt in PROMPTS:
        trace = fasb_generate(model, prompt, pack, alpha=50.0, threshold=0.0, backtrack=3, max_tokens=MAX)
        assert trace.tokens == plain_greedy(model, prompt, MAX)
        assert trace.triggers == [] and len(trace.scores) == MAX


# (b) constant low score: fires at exactly G == min_tokens
def test_constant_score_trigger_schedule(model):
    p, alpha, s = 0.2, 3.0, 3
    prompt = PROMPTS[0]
    trace = fasb_generate(model, prompt, make_pack(model, const_p=p), alpha=alpha, backtrack=s, min_tokens=5,
                          max_tokens=MAX)
    [trig] = trace.triggers
    assert trig["generated"] == 5 and trig["keep"] == 5 - s
    assert trig["steer_from"] == len(prompt) + 5 - s - 1
    assert trig["strength"] == pytest.approx(alpha * (1 - p), rel=1e-6)
    assert trig["score"] == pytest.approx(p, rel=1e-6)
    assert len(trace.tokens) == MAX
    assert len(trace.scores) == 5 + (MAX - trig["keep"])  # forwards before + after the backtrack
    assert trace.score_positions[5] == trig["steer_from"]  # the last kept token is fed again
    # default min_tokens = max(s, 1)
    t2 = fasb_generate(model, prompt, make_pack(model, const_p=p), alpha=alpha, backtrack=s, max_tokens=MAX)
    assert t2.triggers[0]["generated"] == s and t2.triggers[0]["keep"] == 0


# (c) max_backtracks bounds the triggers
def test_max_backtracks(model):
    pack = make_pack(model, const_p=0.3)
    prompt = PROMPTS[1]
    one = fasb_generate(model, prompt, pack, alpha=2.0, backtrack=2, min_tokens=4, max_tokens=MAX)
    two = fasb_generate(model, prompt, pack, alpha=2.0, backtrack=2, min_tokens=4, max_tokens=MAX,
                        max_backtracks=2)
    assert len(one.triggers) == 1 and len(two.triggers) == 2
    assert [t["generated"] for t in two.triggers] == [4, 4] and [t["keep"] for t in two.triggers] == [2, 2]
    assert len(one.tokens) == len(two.tokens) == MAX
    zero = fasb_generate(model, prompt, pack, alpha=2.0, backtrack=2, max_tokens=MAX, max_backtracks=0)
    assert zero.triggers == [] and zero.tokens == plain_greedy(model, prompt, MAX)


# (d) s >= G restarts from the prompt
def test_backtrack_past_the_prompt(model):
    prompt = PROMPTS[2]
    trace = fasb_generate(model, prompt, make_pack(model, const_p=0.1), alpha=4.0, backtrack=6, min_tokens=4,
                          max_tokens=MAX)
    [trig] = trace.triggers
    assert trig["generated"] == 4 and trig["keep"] == 0 and trig["steer_from"] == len(prompt) - 1
    assert len(trace.tokens) == MAX


# the final step is checked even before min_tokens, and EOS handling
def test_final_step_is_checked(model):
    prompt = PROMPTS[0]
    pack = make_pack(model, const_p=0.2)
    trace = fasb_generate(model, prompt, pack, alpha=1.0, backtrack=2, min_tokens=50, max_tokens=6)
    assert [t["generated"] for t in trace.triggers] == [6] and len(trace.tokens) == 6
    first = plain_greedy(model, prompt, 3)[2]
    eos = fasb_generate(model, prompt, pack, alpha=1.0, backtrack=2, min_tokens=50, max_tokens=MAX,
                        eos_token_id=first, ignore_eos=False)
    assert eos.triggers[0]["generated"] == 3 and eos.triggers[0]["keep"] == 1
    quiet = fasb_generate(model, prompt, pack, alpha=1.0, threshold=0.0, max_tokens=MAX, eos_token_id=first,
                          ignore_eos=False)
    assert quiet.tokens == plain_greedy(model, prompt, 3)  # stops at (and keeps) the EOS


# (e) steering changes the continuation, and equals an explicit no-cache computation
@pytest.mark.parametrize("max_backtracks", [1, 2])
def test_steered_continuation_matches_manual(model, max_backtracks):
    p, alpha = 0.25, 12.0
    pack = load_pack(make_pack(model, seed=3, const_p=p))
    prompt = PROMPTS[0]
    trace = fasb_generate(model, prompt, pack, alpha=alpha, backtrack=3, min_tokens=5, max_tokens=MAX,
                          max_backtracks=max_backtracks)
    assert len(trace.triggers) == max_backtracks
    plain = plain_greedy(model, prompt, MAX)
    keep = trace.triggers[-1]["keep"]
    assert trace.tokens[:keep] == plain[:keep] or max_backtracks > 1
    assert trace.tokens[keep:] != plain[keep:]
    # Every final token t_i (i >= first keep) is the argmax of a no-cache forward over prompt + t_<i
    # steering positions >= steer_from of the trigger that was in force when the position was computed.
    seq = prompt + trace.tokens
    steer = {}
    for trig in trace.triggers:
        for pos in range(trig["steer_from"], len(seq)):
            steer[pos] = trig["strength"]
    P = len(prompt)
    first = trace.triggers[0]["keep"]
    logits = manual_logits(model, seq, pack, steer)
    for i in range(first, MAX):
        assert int(logits[P + i - 1].argmax()) == trace.tokens[i], i
    # In the single-backtrack case the first regenerated token is the only thing a direct forward needs.
    if max_backtracks == 1:
        ids = prompt + trace.tokens[:keep]
        direct = manual_logits(model, ids, pack, {len(ids) - 1: alpha * (1 - p)})
        assert int(direct[-1].argmax()) == trace.tokens[keep]


# (f) logged scores = probe_scores_at on the unsteered prefix; triggers fire at the first low check
def test_scores_match_probe_scores_at(model):
    pack = make_pack(model, seed=1)
    prompt = PROMPTS[1]
    trace = fasb_generate(model, prompt, pack, alpha=8.0, threshold=0.0, max_tokens=MAX)
    ref = probe_scores_at(model, prompt + trace.tokens, pack)
    P = len(prompt)
    assert trace.score_positions == list(range(P - 1, P - 1 + MAX))
    assert trace.scores == pytest.approx(ref[P - 1:P - 1 + MAX], abs=1e-5)
    # a threshold between the logged scores fires at the first checked step below it
    s, first = 2, 3
    thr = sorted(trace.scores[first - 1:])[(MAX - first + 1) // 2] + 1e-4
    expected = next(i for i in range(first - 1, MAX) if trace.scores[i] < thr)
    fired = fasb_generate(model, prompt, pack, alpha=8.0, threshold=thr, backtrack=s, min_tokens=first,
                          max_tokens=MAX)
    trig = fired.triggers[0]
    assert trig["generated"] == expected + 1 and trig["keep"] == expected + 1 - s
    assert trig["score"] == pytest.approx(trace.scores[expected], abs=1e-5)
    assert fired.scores[:expected + 1] == pytest.approx(trace.scores[:expected + 1], abs=1e-5)


# pre-steer reads: with every head in one layer, steering (added after the read, at that layer) never
# moves a score, so the steered forwards' scores equal unsteered scores of the final sequence
def test_scores_read_before_the_add(model):
    pack = make_pack(model, seed=2, picks=[(1, 0), (1, 2), (1, 3)])
    prompt = PROMPTS[2]
    trace = fasb_generate(model, prompt, pack, alpha=30.0, threshold=1.0, backtrack=2, min_tokens=3,
                          max_tokens=8, max_backtracks=3)
    assert [t["keep"] for t in trace.triggers] == [1, 1, 1]
    assert trace.tokens != plain_greedy(model, prompt, 8)
    final = probe_scores_at(model, prompt + trace.tokens, pack)
    after = 8 - trace.triggers[-1]["keep"]  # forwards after the last backtrack
    for pos, sc in zip(trace.score_positions[-after:], trace.scores[-after:]):
        assert sc == pytest.approx(final[pos], abs=1e-5)


# (g) MC scoring
def test_mc_logprob(model):
    pack = make_pack(model, seed=4, const_p=0.3)
    prompt, answer = PROMPTS[0], PROMPTS[1] + PROMPTS[2]
    ids = prompt + answer
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    plain = sum(float(lp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
    score, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=10.0, threshold=0.0, backtrack=3)
    assert at is None and score == pytest.approx(plain, abs=1e-4)
    # constant p = 0.3 < 0.5 fires at the first scanned position; steer from max(start, pos - s) = start
    s = 3
    score, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=10.0, threshold=0.5, backtrack=s)
    start = len(prompt) + 4
    assert at == start + s
    lm = torch.log_softmax(manual_logits(model, ids, pack, {q: 10.0 * 0.7 for q in range(start, len(ids))}), -1)
    manual = sum(float(lm[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
    assert score == pytest.approx(manual, abs=1e-4) and abs(score - plain) > 1e-2



def _plain_and_manual(model, prompt, answer, pack, steer, score_from=0):
    ids = prompt + answer
    first = len(prompt) + score_from
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    lm = torch.log_softmax(manual_logits(model, ids, pack, steer), -1)
    plain = sum(float(lp[t - 1, ids[t]]) for t in range(first, len(ids)))
    manual = sum(float(lm[t - 1, ids[t]]) for t in range(first, len(ids)))
    return plain, manual


# (g2) an answer whose last position falls inside the skipped stretch [start, start + s) is still
# checked there (the last position is always checked) and steered from max(start, last - s) = start
@pytest.mark.parametrize("answer_len", [5, 6, 7])  # skip_first 4, s 3: last = P+4 .. P+6
def test_mc_short_answer_checks_its_last_position(model, answer_len):
    pack = make_pack(model, seed=4, const_p=0.3)
    prompt = PROMPTS[0]
    answer = (PROMPTS[1] + PROMPTS[2])[:answer_len]
    start, last = len(prompt) + 4, len(prompt) + answer_len - 1
    assert start <= last < start + 3
    score, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=10.0, threshold=0.5, backtrack=3)
    assert at == last
    plain, manual = _plain_and_manual(model, prompt, answer, pack, {q: 10.0 * 0.7 for q in range(start, last + 1)})
    assert score == pytest.approx(manual, abs=1e-4)
    # steering position q changes the log-prob of tokens after q only: with last == start nothing
    # scored is after a steered position
    assert (abs(score - plain) > 1e-3) == (last > start)


# (g3) an answer that ends before start (T - 1 < start): the walk over [start, T) is empty, nothing is
# checked, the score is the unsteered one
@pytest.mark.parametrize("answer_len", [1, 4])
def test_mc_answer_ending_before_start_is_not_checked(model, answer_len):
    pack = make_pack(model, seed=4, const_p=0.3)
    prompt, answer = PROMPTS[0], (PROMPTS[1] + PROMPTS[2])[:answer_len]
    score, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=10.0, threshold=0.5, backtrack=3)
    plain, _ = _plain_and_manual(model, prompt, answer, pack, {})
    assert at is None and score == pytest.approx(plain, abs=1e-4)


# (g4) with real (random) probes: the checked positions are exactly [start + s, T - 1) and T - 1, in
# order: a threshold just above the score of one position fires there iff no earlier checked one is lower
def test_mc_checked_positions_with_random_probes(model):
    pack = make_pack(model, seed=9)
    prompt, answer = PROMPTS[0], PROMPTS[1] + PROMPTS[2]
    ids = prompt + answer
    scores = probe_scores_at(model, ids, pack)
    s, start, T = 2, len(prompt) + 4, len(ids)
    checked = list(range(start + s, T - 1)) + [T - 1]
    for thr in sorted(set(scores))[:6] + [max(scores) + 1e-3]:
        expect = next((q for q in checked if scores[q] < thr), None)
        _, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=1.0, threshold=thr, backtrack=s)
        assert at == expect


# (g5) score_from leaves the first answer tokens (an "\nA:" marker) unscored, under steering too
def test_mc_score_from(model):
    pack = make_pack(model, seed=4, const_p=0.3)
    prompt, answer = PROMPTS[0], PROMPTS[1] + PROMPTS[2]
    start = len(prompt) + 4
    score, at = fasb_mc_logprob(model, prompt, answer, pack, alpha=10.0, threshold=0.5, backtrack=3, score_from=3)
    _, manual = _plain_and_manual(model, prompt, answer, pack, {q: 7.0 for q in range(start, len(prompt + answer))},
                                  score_from=3)
    assert at == start + 3 and score == pytest.approx(manual, abs=1e-4)


def test_pack_file_and_hooks_removed(model, tmp_path):
    from safetensors.torch import save_file

    pack = make_pack(model, seed=5, const_p=0.2)
    save_file({k: v.contiguous() for k, v in pack.items()}, str(tmp_path / "pack.safetensors"))
    a = fasb_generate(model, PROMPTS[0], pack, alpha=5.0, backtrack=2, max_tokens=6)
    b = fasb_generate(model, PROMPTS[0], tmp_path / "pack.safetensors", alpha=5.0, backtrack=2, max_tokens=6)
    assert a == b
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj._forward_pre_hooks


# ---- strength="paper": strength re-evaluated every step after the first trigger ----------------------


def expected_strengths(trace, alpha, threshold, mode):
    """trace.strengths rebuilt from the trace's scores: a forward whose successor is not at q + 1 is a
    trigger (needs backtrack >= 1): the successor, its steer_from, gets alpha * (1 - p) and positions
    from there are recomputed; after the first trigger, q + 1 gets the trigger's strength ("code") or
    alpha * (1 - p_q) if p_q < threshold else 0.0 ("paper")."""
    pos, sc = trace.score_positions, trace.scores
    out, current, n_triggers = {}, None, 0
    for i in range(len(pos) - 1):
        q, p = pos[i], sc[i]
        if pos[i + 1] != q + 1:
            n_triggers += 1
            current = alpha * (1 - p)
            out = {k: v for k, v in out.items() if k < pos[i + 1]}
            out[pos[i + 1]] = current
        elif current is not None:
            out[q + 1] = current if mode == "code" else (alpha * (1 - p) if p < threshold else 0.0)
    assert n_triggers == len(trace.triggers)
    return out


# (h) constant score below the threshold: the per-step rule gives the trigger's strength every step
@pytest.mark.parametrize("max_backtracks", [1, 2])
def test_paper_constant_score_equals_code(model, max_backtracks):
    c, alpha = 0.25, 12.0
    pack = make_pack(model, seed=3, const_p=c)
    for prompt in PROMPTS[:2]:
        kw = dict(alpha=alpha, backtrack=3, min_tokens=5, max_tokens=MAX, max_backtracks=max_backtracks)
        code = fasb_generate(model, prompt, pack, strength="code", **kw)
        paper = fasb_generate(model, prompt, pack, strength="paper", **kw)
        assert len(paper.triggers) == max_backtracks
        assert paper.tokens == code.tokens and paper.triggers == code.triggers
        assert paper.strengths == code.strengths
        steer_from = paper.triggers[0]["steer_from"]
        assert sorted(paper.strengths) == list(range(steer_from, len(prompt) + MAX - 1))
        assert all(v == pytest.approx(alpha * (1 - c), rel=1e-6) for v in paper.strengths.values())
    with pytest.raises(ValueError):
        fasb_generate(model, PROMPTS[0], pack, alpha=1.0, max_tokens=2, strength="nope")


# (i) random probes: strengths follow the per-step rule, scores fall on both sides, tokens differ
@pytest.mark.parametrize("max_backtracks", [1, 2])
def test_paper_per_step_rule(model, max_backtracks):
    alpha, thr = 8.0, 0.5
    pack = make_pack(model, seed=1)
    kw = dict(alpha=alpha, threshold=thr, backtrack=2, min_tokens=3, max_tokens=MAX, max_backtracks=max_backtracks)
    off = on = 0
    differ = False
    for prompt in PROMPTS:
        code = fasb_generate(model, prompt, pack, strength="code", **kw)
        paper = fasb_generate(model, prompt, pack, strength="paper", **kw)
        assert paper.triggers and code.triggers
        assert code.strengths == pytest.approx(expected_strengths(code, alpha, thr, "code"))
        assert paper.strengths == pytest.approx(expected_strengths(paper, alpha, thr, "paper"))
        assert paper.strengths[paper.triggers[-1]["steer_from"]] == paper.triggers[-1]["strength"]
        assert len(paper.tokens) == MAX and max(paper.strengths) == len(prompt) + MAX - 2
        starts = {t["steer_from"] for t in paper.triggers}
        off += sum(v == 0.0 for v in paper.strengths.values())
        on += sum(v != 0.0 for q, v in paper.strengths.items() if q not in starts)
        differ |= paper.tokens != code.tokens
    assert off > 0 and on > 0  # steps after a trigger with scores above and below the threshold
    assert differ


# (j) paper-mode continuation equals an explicit no-cache forward steered per position
@pytest.mark.parametrize("max_backtracks", [1, 2])
def test_paper_continuation_matches_manual(model, max_backtracks):
    alpha, thr = 8.0, 0.5
    pack = load_pack(make_pack(model, seed=1))
    seen = set()
    for prompt in PROMPTS:
        trace = fasb_generate(model, prompt, pack, alpha=alpha, threshold=thr, backtrack=2, min_tokens=3,
                              max_tokens=MAX, max_backtracks=max_backtracks, strength="paper")
        assert len(trace.triggers) >= 1
        seen |= set(trace.strengths.values())
        seq = prompt + trace.tokens
        logits = manual_logits(model, seq, pack, trace.strengths)
        P = len(prompt)
        for i in range(trace.triggers[0]["keep"], MAX):
            assert int(logits[P + i - 1].argmax()) == trace.tokens[i], (prompt, i)
    assert 0.0 in seen and len(seen - {0.0}) > 1  # unsteered and differently steered positions checked
