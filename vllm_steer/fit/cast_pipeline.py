"""``vllm-steer fit cast``: fit a CAST condition through vLLM and write a condition-only pack.

Input: JSONL rows ``{"prompt": "...", "condition": true|false}`` (``condition`` may also be 1/0):
whether the prompt calls for the behaviour the condition gates (``load_condition_prompts``).

For every prompt, one prefill through the capture engine gives, for every decoder layer, the mean
over all the prompt's tokens of that layer's output. The state of the prompt for condition layer L
is the mean of the residual stream entering layer L, i.e. of the output of layer L - 1 (HF's
``hidden_states[L]``), so the candidate layers are 1 … num_layers - 1 (``layers`` may restrict them).

The prompts are split, seeded and stratified by label, into train and validation (``val_fraction``
of each label to validation, at least one and at most all but one). For each candidate layer the
condition direction is the unit mean difference of the train states (``fit.cast.condition_direction``)
and the validation prompts' similarities are ``cos(h, tanh(P h))``; ``fit.cast.best_condition_point``
picks layer, threshold and comparison by validation F1. The pack holds that point
(``manifest.condition``) and the train direction at its layer (``condition.direction``); it has no
steering method of its own (``methods: []``).

With ``chat_template=True`` each prompt is first rendered as one user message with the generation
prompt (as ``fit l2s --chat-template``), so the states are those of a chat request's prompt.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.capture import CaptureItem, capture_activations, capture_engine
from vllm_steer.fit.cast import best_condition_point, condition_direction, condition_similarity
from vllm_steer.fit.datasets import DatasetError, jsonl_objects
from vllm_steer.fit.l2s_pipeline import render_chat_prompt
from vllm_steer.integration.job_engine import job_max_model_len
from vllm_steer.pack import ModelShape, PackManifest, build_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.manifest import ConditionInfo

DEFAULT_VAL_FRACTION = 0.3  # the grid tries 200 (threshold, comparison) pairs per layer: a small validation
# split would pick a threshold that fits its few prompts by chance, so it gets more than the usual 0.2


@dataclass(frozen=True)
class ConditionPrompt:
    prompt: str
    condition: bool  # the prompt calls for the behaviour


@dataclass(frozen=True)
class CastFitOptions:
    name: str
    layers: tuple[int, ...] | None = None  # candidate condition layers; None: 1 … num_layers - 1
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = 0
    chat_template: bool = False
    max_model_len: int | None = None  # None: the model's own limit, at most 1024 (job_engine.job_max_model_len)
    batch_size: int = 128
    progress: bool = True
    llm_kwargs: dict = field(default_factory=dict)


def load_condition_prompts(path: str | Path) -> list[ConditionPrompt]:
    """Every row of the JSONL file, checked whole: each needs a non-empty string ``prompt`` and a
    boolean (or 0/1) ``condition``, and each label needs at least two prompts (one for training, one
    for validation). Raises DatasetError naming the file, the line and the field."""
    p = Path(path)
    prompts = []
    for _, where, obj in jsonl_objects(p):
        for key in ("prompt", "condition"):
            if key not in obj:
                raise DatasetError(f"{where}: missing key {key!r} (a condition row is "
                                   f"{{\"prompt\": \"...\", \"condition\": true|false}})", field=key)
        prompt, condition = obj["prompt"], obj["condition"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}", field="prompt")
        if isinstance(condition, bool):
            pass
        elif isinstance(condition, int) and condition in (0, 1):
            condition = bool(condition)
        else:
            raise DatasetError(f"{where}: 'condition' must be true/false (or 1/0), got {condition!r}",
                               field="condition")
        prompts.append(ConditionPrompt(prompt, condition))
    counts = {label: sum(q.condition == label for q in prompts) for label in (True, False)}
    for label, count in counts.items():
        if count < 2:
            raise DatasetError(
                f"{p}: {count} prompt(s) with condition {str(label).lower()}; the fit needs at least 2 with "
                f"condition true and 2 with false (one of each for training and for validation), found "
                f"{counts[True]} true and {counts[False]} false", field="condition")
    return prompts


def stratified_split(labels: Sequence[bool], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) row indices, ascending: the rows of each label are shuffled with
    ``random.Random(seed)`` and ``round(val_fraction * count)`` of them (at least 1, at most all but
    one) go to validation. Raises SteeringError when a label has fewer than 2 rows."""
    if not 0.0 < val_fraction < 1.0:
        raise SteeringError(f"val_fraction must be in (0, 1), got {val_fraction}", field="val_fraction")
    rng = random.Random(seed)
    val: list[int] = []
    for label in (True, False):
        rows = [i for i, value in enumerate(labels) if bool(value) == label]
        if len(rows) < 2:
            raise SteeringError(f"{len(rows)} prompt(s) with condition {str(label).lower()}: each split needs "
                                f"both labels, so each label needs at least 2", field="data")
        rng.shuffle(rows)
        val += rows[: min(max(1, round(val_fraction * len(rows))), len(rows) - 1)]
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def candidate_layers(shape: ModelShape, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The condition layers to search: ``layers`` checked (1 … num_layers - 1, no repeats), or all."""
    if layers is None:
        chosen = tuple(range(1, shape.num_layers))
    else:
        chosen = tuple(layers)
        bad = [layer for layer in chosen if not 1 <= layer < shape.num_layers]
        if bad:
            raise SteeringError(f"layer {bad[0]} cannot be a condition layer: the condition reads a layer's input, "
                                f"the output of the layer before, so layers are 1 … {shape.num_layers - 1} for "
                                f"this {shape.num_layers}-layer model", field="layers")
        if len(set(chosen)) != len(chosen):
            raise SteeringError(f"layers repeat: {list(chosen)}", field="layers")
    if not chosen:
        raise SteeringError(f"no condition layer to search: the model has {shape.num_layers} layer(s), and a "
                            f"condition reads the input of layer 1 or later", field="layers")
    return chosen


def capture_prompt_states(llm, token_ids: Sequence[Sequence[int]], shape: ModelShape, layers: Sequence[int], *,
                          batch_size: int = 128, progress: bool = True) -> dict[int, torch.Tensor]:
    """``{L: [N, hidden]}``: each prompt's mean over all its tokens of the stream entering layer L
    (the output of layer L - 1), for each L of ``layers``, captured through the engine ``llm``."""
    items = [CaptureItem(tuple(ids), positions=(len(ids) - 1,), mean_from=0) for ids in token_ids]
    captured = capture_activations(llm, items, shape, batch_size=batch_size, progress=progress)
    return {layer: captured.residual_mean[:, layer - 1].clone() for layer in layers}


def fit_cast_pack(model: str, dataset: str | Path, out: str | Path, options: CastFitOptions, llm=None) -> dict:
    """Fit a CAST condition and write a condition-only pack; returns the fit's record. Nothing is
    written on failure. ``llm``: a capture engine to use (default: one started here for the fit)."""
    from transformers import AutoTokenizer

    t0 = time.time()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SteeringError(f"the output pack path must end in .safetensors: {out}", field="out")
    if out.is_dir():
        raise SteeringError(f"{out} is a folder; name the pack file to write", field="out")
    shape = shape_of_checkpoint(model)
    layers = candidate_layers(shape, options.layers)
    options = replace(options, max_model_len=job_max_model_len(model, options.max_model_len))
    prompts = load_condition_prompts(dataset)
    labels = [q.condition for q in prompts]
    train, val = stratified_split(labels, options.val_fraction, options.seed)

    tokenizer = AutoTokenizer.from_pretrained(model)
    if options.chat_template and not getattr(tokenizer, "chat_template", None):
        raise SteeringError(f"the tokenizer of {model} has no chat template to render the prompts with",
                            field="chat_template")
    token_ids = []
    for q in prompts:
        text = render_chat_prompt(tokenizer, q.prompt) if options.chat_template else q.prompt
        # a rendered chat holds the template's special tokens (vLLM's chat path adds none)
        ids = tokenizer(text, add_special_tokens=not options.chat_template)["input_ids"]
        if len(ids) > options.max_model_len:
            raise SteeringError(f"a prompt of {len(ids)} tokens is longer than max_model_len "
                                f"{options.max_model_len}: {q.prompt[:80]!r}", field="max_model_len")
        token_ids.append(ids)

    own_engine = llm is None
    if own_engine:
        llm = capture_engine(model, max_model_len=options.max_model_len, **options.llm_kwargs)
    try:
        states = capture_prompt_states(llm, token_ids, shape, layers, batch_size=options.batch_size,
                                       progress=options.progress)
    finally:
        if own_engine:
            del llm

    point, directions, per_layer = search_condition(states, labels, train, val)
    prompt_format = "chat" if options.chat_template else "raw"
    record = {
        "pack": str(out), "name": options.name, "layer": point.layer, "threshold": point.threshold,
        "comparison": point.comparison, "val_f1": round(point.f1, 6), "num_prompts": len(prompts),
        "num_train": len(train), "num_val": len(val),
        "num_condition_true": {"train": sum(labels[i] for i in train), "val": sum(labels[i] for i in val)},
        "val_fraction": options.val_fraction, "seed": options.seed, "prompt_format": prompt_format,
        "layers": per_layer, "seconds": round(time.time() - t0, 1),
    }
    manifest = PackManifest(
        name=options.name, model=shape, methods=[], num_heads_selected=0,
        condition=ConditionInfo(layer=point.layer, threshold=point.threshold, comparison=point.comparison),
        metadata={"source": "vllm-steer fit cast", "dataset": Path(dataset).name, "seed": options.seed,
                  "split": {"train": len(train), "val": len(val), "val_fraction": options.val_fraction},
                  "condition": {k: v for k, v in record.items() if k not in ("pack", "name", "seconds")}},
    )
    pack = build_pack(manifest, {"condition.direction": directions[point.layer]})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_pack(out, pack)
    except OSError as exc:
        raise SteeringError(f"cannot write {out}: {exc.strerror or exc}", field="out") from None
    return record


def search_condition(states: dict[int, torch.Tensor], labels: Sequence[bool], train: Sequence[int],
                     val: Sequence[int]):
    """The condition point, each layer's train direction, and each layer's best point (a list of
    ``{"layer", "f1", "threshold", "comparison"}``): directions from the ``train`` rows of
    ``states`` (``{L: [N, hidden]}``), similarities and F1 on the ``val`` rows."""
    truth = torch.tensor([bool(v) for v in labels])
    train_idx, val_idx = torch.tensor(list(train)), torch.tensor(list(val))
    present, absent = train_idx[truth[train_idx]], train_idx[~truth[train_idx]]
    directions, similarities, per_layer = {}, {}, []
    for layer, layer_states in sorted(states.items()):
        directions[layer] = condition_direction(layer_states[present], layer_states[absent])
        similarities[layer] = condition_similarity(layer_states[val_idx], directions[layer])
        best = best_condition_point({layer: similarities[layer]}, truth[val_idx])
        per_layer.append({"layer": layer, "f1": round(best.f1, 6), "threshold": best.threshold,
                          "comparison": best.comparison})
    return best_condition_point(similarities, truth[val_idx]), directions, per_layer
