"""Independent reference for L2S (learn to steer) and Mean-S, in plain HF transformers with hooks.

Written from the method's description (design/methods.md, L2S section); shares no code with
``vllm_steer``. Greedy, batch 1, KV cache, the prompt in one forward.

* The residual stream after decoder layer l is that layer's output (HF ``hidden_states[l + 1]``).
* L2S: ``v = W_out tanh(W_in x + b_in)``, x = the stream after ``read_layer`` at the last prompt
  token, computed once in the prompt's forward. Mean-S: ``v = mean`` from the start.
* ``alpha * v`` is added to the stream after ``steer_layer`` at every position >= ``start``:
  ``start = P - 1`` (the last prompt token, "last") or ``P`` (generated tokens only, "none"). When
  ``read_layer > steer_layer`` the vector does not exist yet when the prompt passes ``steer_layer``,
  so L2S then steers generated tokens only. With ``read_layer == steer_layer`` the read hook runs
  first on that layer's output, so it reads the unsteered stream and the steer hook right after it
  adds the vector in the same forward (the two-pass form's result in one pass).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from reference.hf_steering import greedy_tokens


@contextmanager
def l2s_hooks(model, pack, *, method, alpha, read_layer, steer_layer, start, read_at, state):
    """The read and steer hooks of one L2S / Mean-S request; ``state["offset"]`` must hold the
    position of the forward's first token. Returns (via the context) a dict whose ``reads`` counts
    predictor reads."""
    own = {"vector": pack["l2s.mean"].float() if method == "mean_s" else None, "reads": 0}
    layers = model.model.layers

    def stream_of(output):
        return output[0] if isinstance(output, tuple) else output

    def read_hook(module, args, output):
        if method != "l2s" or own["vector"] is not None:
            return None
        hidden = stream_of(output)
        t = read_at - state["offset"]
        if 0 <= t < hidden.shape[1]:
            x = hidden[0, t].float()
            own["vector"] = pack["l2s.w_out"].float() @ torch.tanh(pack["l2s.w_in"].float() @ x + pack["l2s.b_in"].float())
            own["reads"] += 1
        return None

    def steer_hook(module, args, output):
        if own["vector"] is None:
            return None
        hidden = stream_of(output).clone()
        positions = torch.arange(state["offset"], state["offset"] + hidden.shape[1])
        mask = positions >= start
        hidden[:, mask] = hidden[:, mask] + alpha * own["vector"].to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    # The read hook is registered first: with read_layer == steer_layer it reads the unsteered stream.
    handles = [layers[read_layer].register_forward_hook(read_hook),
               layers[steer_layer].register_forward_hook(steer_hook)]
    try:
        yield own
    finally:
        for h in handles:
            h.remove()


def l2s_start(method, prompt_len, prompt_positions, read_layer, steer_layer) -> int:
    """The first steered position: the last prompt token ("last") or the first generated one
    ("none"), and never before the vector exists (L2S with read_layer > steer_layer)."""
    start = prompt_len - 1 if prompt_positions == "last" else prompt_len
    if method == "l2s" and read_layer > steer_layer:
        start = prompt_len
    return start


def l2s_generate(model, prompt_ids, pack, *, method, alpha, read_layer, steer_layer, max_new_tokens,
                 prompt_positions="last", read_position=None):
    """Greedy tokens and the number of predictor reads. ``read_position`` (default: the last prompt
    token) moves the read elsewhere; only tests' negative controls use it."""
    P = len(prompt_ids)
    read_at = P - 1 if read_position is None else read_position
    start = l2s_start(method, P, prompt_positions, read_layer, steer_layer)
    state = {"offset": 0}
    with l2s_hooks(model, pack, method=method, alpha=alpha, read_layer=read_layer, steer_layer=steer_layer,
                   start=start, read_at=read_at, state=state) as own:
        out = greedy_tokens(model, prompt_ids, max_new_tokens, state)
    return out, own["reads"]
