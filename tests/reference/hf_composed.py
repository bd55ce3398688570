"""Independent reference for composed steering: several specs on one request, summed per position.

Each member gets the single-method reference's hooks (``hf_steering`` for ITI and residual vectors,
``hf_l2s`` for L2S and Mean-S), all on one model at once. HF runs a module's hooks in the order
they were registered, each adding its own term, so every steered position gets the sum. L2S's read
hook goes first, so it reads the stream after its layer before any residual add there (as the
engine does). With a FASB member, ``hf_fasb.fasb_generate(extra_hooks=...)`` installs these after
its own probe-and-steer hooks, so its probes read each layer's heads before any add at that layer.

A member is a plain dict: ``{"heads": [(layer, head, theta, sigma), ...]}`` or ``{"residual":
{layer: vector}}`` with ``alpha`` and ``prompt_positions``; or ``{"l2s": pack_tensors, "method":
"l2s" | "mean_s", "alpha", "read_layer", "steer_layer", "prompt_positions"}``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from reference.hf_l2s import l2s_hooks, l2s_start
from reference.hf_steering import greedy_tokens, steering_hooks


def pack_heads(raw, layers=None, heads=None) -> list:
    """A pack file's ITI heads as (layer, head, theta, sigma), optionally only ``layers`` / ``heads``."""
    wanted = {tuple(h) for h in heads} if heads else None
    return [
        (int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
        for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))
        if (layers is None or int(l) in layers) and (wanted is None or (int(l), int(h)) in wanted)
    ]


def pack_residual(raw, layers=None) -> dict:
    """A pack file's residual vectors by layer, optionally only ``layers``."""
    return {int(l): raw["residual.vector"][i] for i, l in enumerate(raw["residual.layer"])
            if layers is None or int(l) in layers}


@contextmanager
def composed_hooks(model, members, prompt_len, state):
    """Every member's hooks; ``state["offset"]`` must hold the position of the forward's first token."""
    with ExitStack() as stack:
        for m in members:
            if "l2s" in m:
                positions = m.get("prompt_positions", "last")
                stack.enter_context(l2s_hooks(
                    model, m["l2s"], method=m["method"], alpha=m["alpha"], read_layer=m["read_layer"],
                    steer_layer=m["steer_layer"], read_at=prompt_len - 1, state=state,
                    start=l2s_start(m["method"], prompt_len, positions, m["read_layer"], m["steer_layer"])))
        for m in members:
            if "l2s" not in m:
                stack.enter_context(steering_hooks(
                    model, heads=m.get("heads"), residual=m.get("residual"), alpha=m["alpha"],
                    prompt_len=prompt_len, prompt_positions=m.get("prompt_positions", "last"), state=state))
        yield


def composed_generate(model, prompt_ids, max_new_tokens, members) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (EOS ignored) under every member at once."""
    state = {"offset": 0}
    with composed_hooks(model, members, len(prompt_ids), state):
        return greedy_tokens(model, prompt_ids, max_new_tokens, state)
