"""``vllm-steer fit l2s``: capture L2S inputs and targets through vLLM, train the predictor, write a pack.

For each prompt X of the dataset (JSONL pairs or labelled rows, TruthfulQA; or contrastive prompts,
the P2S form; see ``fit.l2s_contrasts``):

* input  ``x_X``: the residual stream after layer L' (``read_layer``) at X's last token;
* target ``z_X = h+ - h-``: the stream after layer L* (``steer_layer``) for X completed with its
  desired minus its undesired continuations (means over them when there are several), at the last
  token (``target="last"``) or averaged over the continuation's tokens (``target="average"``); in the
  P2S form, for X's desired minus its undesired rewriting, at their last tokens.

With ``chat_template=True`` every prompt is first rendered through the model's chat template as
one user message with the generation prompt (what ``LLM.chat`` and ``/v1/chat/completions`` send
to the engine, tokenized the same way: no extra special tokens), so the input is read at the end
of the generation prompt, the token the engine's predictor reads for a chat request. Completions
are appended after the rendered prompt; in the P2S form each rewriting is rendered the same way.
The manifest records it (``l2s.prompt_format``: ``chat`` or ``raw``).

The pack holds the predictor (``l2s.*``), Mean-S (the mean training target) and the training
record; it offers methods ``l2s`` and ``mean_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.capture import CaptureItem, capture_activations, capture_engine
from vllm_steer.fit.l2s import L2STrainOptions, train_l2s
from vllm_steer.fit.l2s_contrasts import load_l2s_contrasts
from vllm_steer.integration.job_engine import job_max_model_len
from vllm_steer.pack import PackManifest, build_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.manifest import L2SInfo


@dataclass(frozen=True)
class L2SFitOptions:
    name: str
    read_layer: int
    steer_layer: int
    target: Literal["last", "average"] = "last"
    chat_template: bool = False  # render prompts through the model's chat template (see the module doc)
    train: L2STrainOptions = L2STrainOptions()
    max_model_len: int | None = None  # None: the model's own limit, at most 1024 (job_engine.job_max_model_len)
    batch_size: int = 128
    progress: bool = True
    llm_kwargs: dict = field(default_factory=dict)


def render_chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as one user message through the tokenizer's chat template, with the generation
    prompt: the text a chat request with that one message sends to the engine. Tokenize it without
    special tokens (they are in the template), as vLLM's chat path does."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def fit_l2s_pack(model: str, dataset: str | Path, out: str | Path, options: L2SFitOptions, llm=None) -> dict:
    """Fit and write an L2S pack; returns the training record. Nothing is written on failure."""
    from transformers import AutoTokenizer

    t0 = time.time()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SteeringError(f"the output pack path must end in .safetensors: {out}", field="out")
    shape = shape_of_checkpoint(model)
    options = replace(options, max_model_len=job_max_model_len(model, options.max_model_len))
    for name in ("read_layer", "steer_layer"):
        if not 0 <= getattr(options, name) < shape.num_layers:
            raise SteeringError(f"{name} must be in [0, {shape.num_layers}), got {getattr(options, name)}",
                                field=name)
    contrasts = load_l2s_contrasts(dataset)
    if len(contrasts) < 4:
        raise SteeringError(
            f"L2S needs at least 4 prompts with both a desired and an undesired text, found {len(contrasts)}",
            field="data",
        )
    if options.target == "average" and not all(c.extends_prompt for c in contrasts):
        raise SteeringError("target 'average' averages over a completion's tokens; contrastive prompts "
                            "(positive_prompt / negative_prompt) have none: use target 'last'", field="target")
    tokenizer = AutoTokenizer.from_pretrained(model)
    if options.chat_template and not getattr(tokenizer, "chat_template", None):
        raise SteeringError(f"the tokenizer of {model} has no chat template to render the prompts with",
                            field="chat_template")

    def rendered(prompt: str) -> str:
        return render_chat_prompt(tokenizer, prompt) if options.chat_template else prompt

    def token_ids(text: str) -> tuple[int, ...]:
        # a rendered chat already holds the template's special tokens (vLLM's chat path adds none)
        ids = tuple(tokenizer(text, add_special_tokens=not options.chat_template)["input_ids"])
        if len(ids) > options.max_model_len:
            raise SteeringError(f"a text of {len(ids)} tokens is longer than max_model_len "
                                f"{options.max_model_len}: {text[:80]!r}", field="max_model_len")
        return ids

    prompt_items, completion_items, owners = [], [], []
    for j, contrast in enumerate(contrasts):
        prompt_text = rendered(contrast.prompt)
        prompt_ids = token_ids(prompt_text)
        prompt_items.append(CaptureItem(prompt_ids, positions=(len(prompt_ids) - 1,), mean_from=None))
        for label, texts in ((1, contrast.desired), (0, contrast.undesired)):
            for text in texts:
                if contrast.extends_prompt:  # prompt + completion: the completion follows the rendered prompt
                    text = prompt_text + text[len(contrast.prompt):]
                else:  # a rewriting of the prompt: rendered as a prompt itself
                    text = rendered(text)
                full = token_ids(text)
                start = min(len(prompt_ids), len(full) - 1) if contrast.extends_prompt else len(full) - 1
                completion_items.append(CaptureItem(full, positions=(len(full) - 1,), mean_from=start))
                owners.append((j, label))

    own_engine = llm is None
    if own_engine:
        llm = capture_engine(model, max_model_len=options.max_model_len, **options.llm_kwargs)
    try:
        at_prompt = capture_activations(llm, prompt_items, shape, batch_size=options.batch_size,
                                        progress=options.progress)
        at_completion = capture_activations(llm, completion_items, shape, batch_size=options.batch_size,
                                            progress=options.progress)
    finally:
        if own_engine:
            del llm

    x = at_prompt.residual_at[:, 0, options.read_layer]
    stream = (at_completion.residual_at[:, 0] if options.target == "last" else at_completion.residual_mean)
    stream = stream[:, options.steer_layer]
    sums = torch.zeros(len(contrasts), 2, shape.hidden_size)
    counts = torch.zeros(len(contrasts), 2)
    for row, (j, label) in enumerate(owners):
        sums[j, label] += stream[row]
        counts[j, label] += 1
    means = sums / counts.unsqueeze(-1)
    z = means[:, 1] - means[:, 0]

    fit = train_l2s(x, z, options.train)
    prompt_format = "chat" if options.chat_template else "raw"
    record = fit.record | {"target": options.target, "prompt_format": prompt_format, "num_prompts": len(contrasts),
                           "seconds": round(time.time() - t0, 1)}
    manifest = PackManifest(
        name=options.name, model=shape, methods=["l2s", "mean_s"], num_heads_selected=0,
        l2s=L2SInfo(read_layer=options.read_layer, steer_layer=options.steer_layer, width=fit.w_in.shape[0],
                    prompt_format=prompt_format),
        metadata={"source": "vllm-steer fit l2s", "dataset": Path(dataset).name, "l2s": record},
    )
    pack = build_pack(manifest, {"l2s.w_in": fit.w_in, "l2s.b_in": fit.b_in, "l2s.w_out": fit.w_out,
                                 "l2s.mean": fit.mean})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pack(out, pack)
    return record
