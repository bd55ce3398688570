"""IBM activation-steering's ``.svec`` files (``SteeringVector.save``): plain JSON,
``{"model_type": str, "directions": {"<L>": [floats]}, "explained_variances": {"<L>": float}}``.

Layer L: the library measures direction L at the output of layer L but adds it to the *input* of
layer L (its ``LeashLayer`` wraps each decoder layer and changes the incoming hidden states), i.e.
the output of layer L - 1. We reproduce where it is applied: our residual layer L - 1. L = 0 (the
embeddings) is not a decoder layer's output and is refused. Writing does the inverse (our layer l is
saved as L = l + 1).

The library itself is not on the package registries (git only), so the tests write its JSON with the
standard library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vllm_steer.errors import PackError
from vllm_steer.interop.layer_vectors import LayerVectors

FORMAT = "ibm-activation-steering-svec"
MAPPING = "directions[L] -> output of decoder layer L-1 (activation-steering adds it to layer L's input)"


def read_svec(path: Path) -> LayerVectors:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"{path}: not a JSON .svec file ({exc})", field="file") from None
    directions = data.get("directions") if isinstance(data, dict) else None
    if not isinstance(directions, dict):
        raise PackError(f"{path}: a .svec file needs a 'directions' object {{layer: [floats]}}", field="file")
    vectors: dict[int, torch.Tensor] = {}
    for key, values in directions.items():
        if not str(key).lstrip("-").isdigit():
            raise PackError(f"{path}: directions key {key!r} is not a layer number", field="file")
        layer = int(key)
        if layer <= 0:
            raise PackError(f"{path}: directions[{key}] is added to the input of layer {layer}, which is not the "
                            "output of any decoder layer (the embeddings); it cannot be imported", field="layer")
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise PackError(f"{path}: directions[{key}] must be a list of finite numbers", field="file")
        vectors[layer - 1] = torch.tensor(values, dtype=torch.float32)
    metadata = {"model_type": data.get("model_type")}
    variances = data.get("explained_variances")
    if isinstance(variances, dict):
        metadata["explained_variances"] = {k: variances[k] for k in sorted(variances, key=str)}
    return LayerVectors(vectors, FORMAT, MAPPING, metadata)


def write_svec(path: Path, vectors: dict[int, torch.Tensor], model_type: str) -> None:
    data = {"model_type": model_type,
            "directions": {str(layer + 1): v.to(torch.float32).tolist() for layer, v in sorted(vectors.items())},
            "explained_variances": {str(layer + 1): 1.0 for layer in sorted(vectors)}}
    path.write_text(json.dumps(data), encoding="utf-8")
