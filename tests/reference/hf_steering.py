"""Independent reference for steering, in plain HF transformers with forward hooks.

Written from the methods' formulas, sharing no code with vllm_steer:

* ITI: for each selected head (layer l, head h, unit direction theta, sigma), add
  ``alpha * sigma * theta`` to columns ``h*D:(h+1)*D`` of the input of layer l's ``o_proj``.
* Residual (mean-difference): add ``alpha * v_l`` to the output hidden states of decoder layer l.

Positions: ``last`` = the last prompt token and every generated token, ``all`` = every token,
``none`` = generated tokens only (positions >= prompt length). Decoding is greedy, batch 1, with
the KV cache, one token per step after the prompt.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _first_steered_position(mode: str, prompt_len: int) -> int:
    starts = {"last": prompt_len - 1, "all": 0, "none": prompt_len}
    if mode not in starts:
        raise ValueError(f"prompt_positions must be one of {sorted(starts)}, got {mode!r}")
    return starts[mode]


@contextmanager
def steering_hooks(model, *, heads=None, residual=None, alpha=0.0, prompt_len=0, prompt_positions="last",
                   state=None):
    """Install the hooks; ``state["offset"]`` must hold the position of the forward's first token."""
    layers = model.model.layers
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    start = _first_steered_position(prompt_positions, prompt_len)
    handles = []

    def steered_mask(num_tokens: int) -> torch.Tensor:
        positions = torch.arange(state["offset"], state["offset"] + num_tokens, device=model.device)
        return positions >= start

    by_layer: dict[int, list] = {}
    for layer, head, direction, sigma in heads or []:
        by_layer.setdefault(layer, []).append((head, direction, sigma))

    def make_head_hook(entries):
        def hook(module, args):
            x = args[0].clone()  # [B, T, H*D]
            mask = steered_mask(x.shape[1])
            for head, direction, sigma in entries:
                cols = slice(head * head_dim, (head + 1) * head_dim)
                x[:, mask, cols] = x[:, mask, cols] + alpha * sigma * direction.to(x.device, x.dtype)
            return (x,) + tuple(args[1:])

        return hook

    def make_residual_hook(vector):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            mask = steered_mask(hidden.shape[1])
            hidden[:, mask, :] = hidden[:, mask, :] + alpha * vector.to(hidden.device, hidden.dtype)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return hook

    try:
        for layer, entries in by_layer.items():
            handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(make_head_hook(entries)))
        for layer, vector in (residual or {}).items():
            handles.append(layers[layer].register_forward_hook(make_residual_hook(vector)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def greedy_tokens(model, prompt_ids, max_new_tokens, state, logprobs=None) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (EOS ignored) with the KV cache, one token per step after
    the prompt; ``state["offset"]`` holds the position of each forward's first token for the hooks.
    ``logprobs``, a list, receives each chosen token's log-softmax of the logits."""
    out: list[int] = []
    ids = torch.tensor([[int(t) for t in prompt_ids]], device=model.device)
    past = None
    for _ in range(max_new_tokens):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        state["offset"] += ids.shape[1]
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        if logprobs is not None:
            logprobs.append(float(torch.log_softmax(result.logits[0, -1].float(), dim=-1)[token]))
        ids = torch.tensor([[token]], device=model.device)
    return out


def greedy_generate(model, prompt_ids, max_new_tokens, *, heads=None, residual=None, alpha=0.0,
                    prompt_positions="last", logprobs=None):
    """Greedy continuation of ``prompt_ids`` (EOS ignored); ``heads`` = [(layer, head, theta, sigma)],
    ``residual`` = {layer: vector}; ``logprobs`` as in ``greedy_tokens``."""
    state = {"offset": 0}
    with steering_hooks(model, heads=heads, residual=residual, alpha=alpha, prompt_len=len(prompt_ids),
                        prompt_positions=prompt_positions, state=state):
        return greedy_tokens(model, prompt_ids, max_new_tokens, state, logprobs)
