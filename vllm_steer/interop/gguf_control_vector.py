"""llama.cpp / repeng control vectors (GGUF), read and written with the ``gguf`` package.

The layout, as llama.cpp reads it (``common_control_vector_load_one`` in its common/common.cpp) and
repeng writes it (``ControlVector.export_gguf``): ``general.architecture = "controlvector"``; tensors
``direction.<k>``, float32, one-dimensional, hidden-size long; optional ``controlvector.model_hint``
(a model-family name) and ``controlvector.layer_count``. llama.cpp reads only the tensors.

Layer k: llama.cpp adds ``direction.k`` to the output of block k (0-based), after the block's MLP
residual add (``build_cvec`` in each model graph, ``llama_adapter_cvec::apply_to``); repeng applies
its key k to the output of ``model.layers[k]``. That is our residual layer k, unchanged. llama.cpp
refuses a file with ``direction.0`` (it never steers block 0's output), so exporting a vector at our
layer 0 is refused, and reading one is accepted (it is well defined for us) with a note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vllm_steer.errors import PackError
from vllm_steer.interop.layer_vectors import LayerVectors

ARCHITECTURE = "controlvector"
FORMAT = "gguf-control-vector"
MAPPING = "direction.k -> output of decoder layer k (llama.cpp and repeng: added after block k)"
GGUF_MAGIC = b"GGUF"


def read_gguf_control_vector(path: Path) -> LayerVectors:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or corrupt file
        raise PackError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})", field="file") from None
    fields = {name: f for name, f in reader.fields.items()}
    architecture = _field_value(fields.get("general.architecture"))
    if architecture != ARCHITECTURE:
        raise PackError(
            f"{path}: a GGUF file whose general.architecture is {architecture!r}, not {ARCHITECTURE!r}: "
            "a model, not a control vector", field="file")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, suffix = tensor.name.partition(".")
        if prefix != "direction" or not suffix.isdigit():
            raise PackError(f"{path}: tensor {tensor.name!r} is not direction.<layer> (llama.cpp would refuse "
                            "the file too)", field="file")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise PackError(f"{path}: tensor {tensor.name!r} must be 1-D float32 "
                            f"(got {tensor.tensor_type.name}, shape {list(tensor.shape)})", field="file")
        layer = int(suffix)
        vector = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        vectors[layer] = vectors[layer] + vector if layer in vectors else vector  # llama.cpp adds repeats
    metadata = {key: _field_value(fields[full]) for key, full in
                (("model_hint", "controlvector.model_hint"), ("layer_count", "controlvector.layer_count"),
                 ("method", "controlvector.method")) if full in fields}
    return LayerVectors(vectors, FORMAT, MAPPING, metadata)


def write_gguf_control_vector(path: Path, vectors: dict[int, torch.Tensor], model_hint: str) -> None:
    """Write ``vectors`` (our layers) as a control vector llama.cpp and repeng read."""
    import gguf

    if 0 in vectors:
        raise PackError("layer 0: llama.cpp never steers block 0's output and refuses a file with direction.0; "
                        "export a pack without a vector at layer 0", field="layer")
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vectors))
    for layer, vector in sorted(vectors.items()):
        writer.add_tensor(f"direction.{layer}", vector.detach().to(torch.float32).cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_hint_of(architecture: str) -> str:
    """The family name llama.cpp-style hints use, from an HF architecture: LlamaForCausalLM -> llama."""
    for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
        if architecture.endswith(suffix):
            return architecture[: -len(suffix)].lower()
    return architecture.lower()


def _field_value(field):
    if field is None:
        return None
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value
