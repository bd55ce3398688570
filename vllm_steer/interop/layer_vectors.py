"""Per-layer residual vectors from another tool, keyed by our layer convention, and the residual
steer pack built from them.

Our convention: layer ``l`` means the output of decoder layer ``l`` (0-based), i.e. the residual
stream after the layer's attention and MLP residual adds (HF ``model.layers[l]``'s output,
``output_hidden_states[l + 1]``, TransformerLens ``blocks.l.hook_resid_post``). That is where llama.cpp
adds ``direction.l`` of a control vector, and where our residual steering adds ``residual.vector``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_steer.errors import PackError
from vllm_steer.pack import ModelShape, PackManifest, SteerPack, build_pack


@dataclass
class LayerVectors:
    """Vectors read from a foreign file: ``vectors[l]`` is added to the output of decoder layer l."""

    vectors: dict[int, torch.Tensor]
    source_format: str  # e.g. "gguf-control-vector"
    layer_mapping: str  # how the file's layer numbers became ours, in words
    metadata: dict[str, Any] = field(default_factory=dict)  # what the file says about itself

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in sorted(self.vectors.items())}


def checked_vectors(vectors: LayerVectors, model: ModelShape, source: str) -> LayerVectors:
    """Refuse, naming the layer, vectors that do not fit ``model``: a layer outside the model, a length
    other than its hidden size, non-finite values; and a file with no vector at all."""
    if not vectors.vectors:
        raise PackError(f"{source}: no steering vector in the file", field="file")
    for layer, vector in sorted(vectors.vectors.items()):
        if not 0 <= layer < model.num_layers:
            raise PackError(
                f"{source}: a vector for layer {layer} ({vectors.layer_mapping}), but the model has layers "
                f"0..{model.num_layers - 1}", field="layer")
        if tuple(vector.shape) != (model.hidden_size,):
            raise PackError(
                f"{source}: the vector for layer {layer} has shape {tuple(vector.shape)}, the model's hidden "
                f"size is {model.hidden_size}", field="layer")
        if not torch.isfinite(vector).all():
            raise PackError(f"{source}: the vector for layer {layer} has non-finite values", field="layer")
    return vectors


def residual_pack(vectors: LayerVectors, model: ModelShape, name: str, source: str) -> SteerPack:
    """A residual-steering pack holding ``vectors`` (checked against ``model``); the manifest's metadata
    records where they came from and how their layers were mapped."""
    checked_vectors(vectors, model, source)
    layers = sorted(vectors.vectors)
    manifest = PackManifest(
        name=name, model=model, methods=["residual"], num_heads_selected=0, residual_layers=layers,
        metadata={"imported_from": {"format": vectors.source_format, "file": source,
                                    "layer_mapping": vectors.layer_mapping, **vectors.metadata}},
    )
    tensors = {
        "residual.layer": torch.tensor(layers, dtype=torch.int64),
        "residual.vector": torch.stack([vectors.vectors[l].to(torch.float32) for l in layers]),
    }
    return build_pack(manifest, tensors)


def pack_residual_vectors(pack: SteerPack) -> dict[int, torch.Tensor]:
    """A pack's residual vectors by layer (our convention), for export; refuses a pack without any."""
    if not pack.residual_layers.numel():
        raise PackError(
            f"steer pack {pack.name!r} has no residual vectors to export (other tools' formats carry "
            "per-layer residual vectors; head-level ITI directions have no equivalent there)", field="pack")
    return {int(l): pack.residual_vectors[i] for i, l in enumerate(pack.residual_layers.tolist())}
