"""Per-layer vectors in plain tensor files, as steering-vectors users, EasySteer, hotwire and others
save them: safetensors, numpy ``.npy`` or ``.npz``.

Accepted layouts (row or key ``i`` is added to the output of decoder layer i, the convention of
those tools: a forward hook on ``model.layers[i]``):

* one 2-D tensor ``[num_layers, hidden]``: row i for layer i; all-zero rows are layers not steered;
* one 1-D tensor ``[hidden]``: one vector, for the layer given by ``layer`` (``--layer``);
* several 1-D tensors keyed by layer: ``12``, ``layer_12``, ``layers.12``, ``model.layers.12``,
  ``direction.12``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from vllm_steer.errors import PackError
from vllm_steer.interop.layer_vectors import LayerVectors

FORMAT = "per-layer-tensors"
MAPPING = "row or key i -> output of decoder layer i"
_LAYER_KEY = re.compile(r"^(?:(?:model\.)?layers?[._]|direction\.)?(\d+)$")
KEY_FORMS = "'12', 'layer_12', 'layers.12', 'model.layers.12' or 'direction.12'"


def read_tensor_file(path: Path, layer: int | None = None) -> LayerVectors:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        from vllm_steer.pack.manifest import MANIFEST_METADATA_KEY

        try:
            with safe_open(str(path), framework="pt") as f:
                ours = MANIFEST_METADATA_KEY in (f.metadata() or {})
                tensors = {} if ours else {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise PackError(f"{path}: not a readable safetensors file ({exc})", field="file") from None
        if ours:
            raise PackError(f"{path}: already a vllm-steer pack; load it as it is", field="file")
    elif suffix in (".npy", ".npz"):
        try:  # allow_pickle=False: an object array (pickle) is refused, never unpickled
            loaded = np.load(str(path), allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise PackError(f"{path}: not a readable numpy file without pickled objects ({exc})",
                            field="file") from None
        if isinstance(loaded, np.ndarray):
            tensors = {"": _numeric(path, "", loaded)}
        else:
            with loaded:
                tensors = {k: _numeric(path, k, loaded[k]) for k in loaded.files}
    else:
        raise PackError(f"{path}: per-layer vectors are read from .safetensors, .npy or .npz files", field="file")
    return LayerVectors(_by_layer(path, tensors, layer), FORMAT, MAPPING, {})


def _numeric(path: Path, key: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "fiu":
        raise PackError(f"{path}: array {key or '(the only one)'} has dtype {array.dtype}, not numbers", field="file")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _by_layer(path: Path, tensors: dict[str, torch.Tensor], layer: int | None) -> dict[int, torch.Tensor]:
    if not tensors:
        raise PackError(f"{path}: the file holds no tensor", field="file")
    if len(tensors) == 1:
        (key, t), = tensors.items()
        t = t.to(torch.float32)
        if t.dim() == 2:
            if layer is not None:
                raise PackError(f"{path}: --layer is for a file holding one vector; this one holds a "
                                f"[layers, hidden] matrix {tuple(t.shape)}", field="--layer")
            return {i: row for i, row in enumerate(t) if bool(row.any())}
        if t.dim() == 1 and (layer is not None or not _LAYER_KEY.match(key)):
            if layer is None:
                raise PackError(f"{path}: one vector without a layer: name the decoder layer whose output it is "
                                "added to with --layer", field="--layer")
            return {layer: t}
    if layer is not None:
        raise PackError(f"{path}: --layer is for a file holding one vector; this one holds {len(tensors)} tensors "
                        "keyed by layer", field="--layer")
    vectors = {}
    for key, t in tensors.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise PackError(f"{path}: tensor {key!r} is not keyed by a layer ({KEY_FORMS})", field="file")
        if t.dim() != 1:
            raise PackError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}; a per-layer vector is 1-D",
                            field="file")
        index = int(match.group(1))
        if index in vectors:
            raise PackError(f"{path}: two tensors for layer {index}", field="file")
        vectors[index] = t.to(torch.float32)
    return vectors
