"""The fit pipeline: labelled completions -> activations captured through vLLM -> per-head probes ->
top-K heads -> directions and sigma -> residual vectors -> one steer pack (+ an accuracy heatmap).

Follows ITI's reference recipe (methods.md): activations at the last token of prompt+completion
(or the mean over the completion's tokens), one logistic probe per (layer, head), train/val split by
question, heads ranked by validation accuracy, mass-mean directions (or probe weights), sigma = std
of the projection of "tuning" activations on each direction. The probes' regularisation: by default C
is picked on the validation split from ``probes.DEFAULT_C_GRID``; ``probe_c`` fixes it (the ITI and
FASB reference code fit sklearn's default, C = 1). The manifest records which (``probe_C_selection``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, Sequence

import torch
from pydantic import TypeAdapter, ValidationError

from vllm_steer.errors import SteeringError
from vllm_steer.fit.capture import CAPTURE_MAX_NUM_SEQS, CaptureItem, capture_activations, capture_engine
from vllm_steer.fit.datasets import LabeledCompletion, check_lengths, load_dataset, split_groups, tuning_prompts
from vllm_steer.fit.directions import (
    mass_mean_directions,
    probe_directions,
    projection_sigma,
    residual_mean_difference,
)
from vllm_steer.fit.heatmap import save_accuracy_heatmap
from vllm_steer.fit.probes import DEFAULT_C_GRID, train_head_probes
from vllm_steer.pack import PackManifest, build_pack, save_pack
from vllm_steer.integration.job_engine import CheckpointFacts, checkpoint_facts, job_max_model_len

Position = Literal["last", "mean"]
DEFAULT_NUM_HEADS = 48  # ITI's K for 7B-size models
_PACK_NAME = TypeAdapter(Annotated[str, PackManifest.model_fields["name"]])


@dataclass
class FitOptions:
    name: str
    num_heads: int | None = None  # K; None: DEFAULT_NUM_HEADS, or every head of a smaller model
    seed: int = 42
    val_fraction: float = 0.2
    position: Position = "last"
    direction: Literal["mass_mean", "probe"] = "mass_mean"
    probe_c: float | None = None  # None: C picked on the validation split from DEFAULT_C_GRID; else this C
    residual_layers: Sequence[int] | Literal["all", "none"] = "all"
    max_model_len: int | None = None  # None: the model's own limit, at most 1024 (job_engine.job_max_model_len)
    batch_size: int = 128
    progress: bool = True
    llm_kwargs: dict = field(default_factory=dict)

    def check(self, model: CheckpointFacts) -> FitOptions:
        """These options with K and ``max_model_len`` resolved for ``model``; raises SteeringError naming the
        option (``field``) when one is out of range, before anything is loaded or started."""
        check_pack_name(self.name)
        shape = model.shape
        most = shape.num_layers * shape.num_heads
        num_heads = min(DEFAULT_NUM_HEADS, most) if self.num_heads is None else self.num_heads
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 1 <= num_heads <= most:
            raise SteeringError(f"num_heads (K) must be in [1, {most}] (the model has {shape.num_layers} layers x "
                                f"{shape.num_heads} heads), got {num_heads!r}", field="num_heads")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise SteeringError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}", field="val_fraction")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SteeringError(f"batch_size must be an integer >= 1, got {self.batch_size!r}", field="batch_size")
        if self.position not in ("last", "mean"):
            raise SteeringError(f"position must be 'last' or 'mean', got {self.position!r}", field="position")
        c = self.probe_c
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise SteeringError(f"probe_c must be a finite number > 0 (sklearn's C), got {c!r}", field="probe_c")
        if self.direction not in ("mass_mean", "probe"):
            raise SteeringError(f"direction must be 'mass_mean' or 'probe', got {self.direction!r}", field="direction")
        if self.residual_layers not in ("all", "none"):
            bad = [l for l in self.residual_layers
                   if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < shape.num_layers]
            if bad:
                raise SteeringError(f"residual_layers must be layers in [0, {shape.num_layers}), got {bad}",
                                    field="residual_layers")
        return replace(self, num_heads=num_heads, max_model_len=job_max_model_len(model, self.max_model_len))


def check_pack_path(out: str | Path) -> Path:
    """``out`` as a Path; raises SteeringError(field="out") unless it names a .safetensors file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SteeringError(f"the output pack path must end in .safetensors: {out}", field="out")
    return out


def check_pack_name(name: str) -> None:
    """Raise SteeringError(field="name") unless ``name`` is a valid pack name (the manifest's rule)."""
    try:
        _PACK_NAME.validate_python(name)
    except ValidationError as exc:
        raise SteeringError(f"pack name {name!r} is invalid: {exc.errors()[0]['msg']} (letters, digits, "
                            "'_', '.', '-'; at most 128)", field="name") from None


@dataclass
class FitReport:
    pack_path: Path
    heatmap_path: Path
    selected_heads: list[tuple[int, int]]
    selected_val_accuracy: list[float]
    best_val_accuracy: dict[str, float]  # per capture position
    num_train: int
    num_val: int
    seconds: float

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["pack_path"], d["heatmap_path"] = str(self.pack_path), str(self.heatmap_path)
        return json.dumps(d, indent=2)


def _tokenize(examples: Sequence[LabeledCompletion], tokenizer) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt+completion and where the completion starts (the prompt's length)."""
    ids, starts = [], []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        full = tokenizer(ex.prompt + ex.completion, add_special_tokens=True)["input_ids"]
        start = min(len(prompt_ids), len(full) - 1)
        ids.append(full)
        starts.append(start)
    return ids, starts


def fit_steer_pack(model: str, dataset: str | Path, out: str | Path, options: FitOptions, llm=None) -> FitReport:
    """Fit a pack on ``dataset`` for ``model`` and write it to ``out`` (a ``.safetensors`` path).

    ``llm`` may be an existing capture engine (``capture_engine``); otherwise one is started.
    Nothing is written unless every step succeeds.
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    out = check_pack_path(out)
    facts = checkpoint_facts(model)
    shape = facts.shape
    options = options.check(facts)
    examples = load_dataset(dataset)
    tokenizer = AutoTokenizer.from_pretrained(model)
    check_lengths(examples, tokenizer, options.max_model_len)
    train_idx, val_idx = split_groups(examples, val_fraction=options.val_fraction, seed=options.seed)
    labels = torch.tensor([ex.label for ex in examples])
    token_ids, starts = _tokenize(examples, tokenizer)
    tuning_ids = [
        tokenizer(text, add_special_tokens=True)["input_ids"][: options.max_model_len]
        for text in tuning_prompts(examples, seed=options.seed)
    ]

    own_engine = llm is None
    if own_engine:
        llm = capture_engine(model, **{"max_model_len": options.max_model_len,
                                       "max_num_seqs": min(options.batch_size, CAPTURE_MAX_NUM_SEQS),
                                       **options.llm_kwargs})
    try:
        captured = capture_activations(
            llm,
            [CaptureItem(tuple(ids), positions=(len(ids) - 1,), mean_from=start) for ids, start in zip(token_ids, starts)],
            shape, batch_size=options.batch_size, progress=options.progress,
        )
        tuning = capture_activations(
            llm, [CaptureItem(tuple(ids), positions=(len(ids) - 1,), mean_from=None) for ids in tuning_ids],
            shape, batch_size=options.batch_size, progress=options.progress,
        )
    finally:
        if own_engine:
            del llm

    features = {"last": captured.heads_at[:, 0], "mean": captured.heads_mean}
    grid = DEFAULT_C_GRID if options.probe_c is None else (float(options.probe_c),)
    probes_by_position = {
        pos: train_head_probes(feats, labels, train_idx, val_idx, l2_grid=grid, seed=options.seed,
                               progress=options.progress)
        for pos, feats in features.items()
    }
    probes = probes_by_position[options.position]
    selected = probes.top_k(options.num_heads)
    fit_idx = sorted(set(train_idx) | set(val_idx))
    chosen = features[options.position]
    if options.direction == "mass_mean":
        directions = mass_mean_directions(chosen, labels, fit_idx)
    else:
        directions = probe_directions(probes)
    sigma = projection_sigma(tuning.heads_at[:, 0], directions)

    if options.residual_layers == "all":
        res_layers = list(range(shape.num_layers))
    elif options.residual_layers == "none":
        res_layers = []
    else:
        res_layers = sorted(set(int(l) for l in options.residual_layers))
    stream = captured.residual_at[:, 0] if options.position == "last" else captured.residual_mean
    residual = residual_mean_difference(stream, labels, fit_idx) if res_layers else None

    layers_t = torch.tensor([l for l, _ in selected], dtype=torch.int64)
    heads_t = torch.tensor([h for _, h in selected], dtype=torch.int64)
    tensors = {
        "heads.layer": layers_t,
        "heads.head": heads_t,
        "heads.direction": directions[layers_t, heads_t].float(),
        "heads.sigma": sigma[layers_t, heads_t].float(),
        "residual.layer": torch.tensor(res_layers, dtype=torch.int64),
        "residual.vector": residual[res_layers].float() if res_layers else torch.zeros(0, shape.hidden_size),
        "probes.weight": probes.weight[layers_t, heads_t].float(),
        "probes.bias": probes.bias[layers_t, heads_t].float(),
    }
    selected_acc = [float(probes.val_accuracy[l, h]) for l, h in selected]
    best = {pos: float(p.val_accuracy.max()) for pos, p in probes_by_position.items()}
    manifest = PackManifest(
        name=options.name,
        model=shape,
        methods=["iti"] + (["residual"] if res_layers else []),
        num_heads_selected=len(selected),
        residual_layers=res_layers,
        has_probes=True,
        metadata={
            "dataset": Path(dataset).name,
            "num_examples": len(examples),
            "split": {"train": len(train_idx), "val": len(val_idx), "by": "group", "seed": options.seed,
                      "val_fraction": options.val_fraction},
            "K": len(selected),
            "position": options.position,
            "direction": options.direction,
            "probe_C": sorted(set(probes.c.flatten().tolist())),  # sklearn's C: penalty ||w||^2 / (2C)
            "probe_C_selection": "validation" if options.probe_c is None else "fixed",
            "probe_C_grid": list(grid),
            "selected_val_accuracy": selected_acc,
            "best_val_accuracy_by_position": best,
        },
    )
    pack = build_pack(manifest, tensors)
    heatmap_path = out.with_suffix(".heads.png")
    save_accuracy_heatmap(probes.val_accuracy, selected, heatmap_path,
                          title=f"{options.name}: probe validation accuracy ({options.position} token)")
    save_pack(out, pack)
    return FitReport(
        pack_path=out, heatmap_path=heatmap_path, selected_heads=selected, selected_val_accuracy=selected_acc,
        best_val_accuracy=best, num_train=len(train_idx), num_val=len(val_idx), seconds=time.time() - t0,
    )
