"""Which foreign format a file is, reading it into ``LayerVectors``, and writing ours out.

Pickle-based files (``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.bin``, ``.ckpt``) are refused: loading
them can run arbitrary code. The message says how to convert one to safetensors.
"""

from __future__ import annotations

from pathlib import Path

from vllm_steer.errors import PackError
from vllm_steer.interop import EXPORT_FORMATS, IMPORT_FORMATS, gguf_control_vector, sae_lens, svec, tensor_files
from vllm_steer.interop.layer_vectors import LayerVectors, pack_residual_vectors
from vllm_steer.pack import SteerPack

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
CONVERT_PICKLE = (
    "convert it where you trust the file: python -c \"import torch, safetensors.torch as st; "
    "t = torch.load('IN.pt', weights_only=True); st.save_file({'vectors': t.float().contiguous()}, 'OUT.safetensors')\" "
    "(a [layers, hidden] tensor; a dict of per-layer tensors: save the dict, keys like 'layers.12')"
)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if sae_lens.is_sae_folder(path):
            return "sae"
        raise PackError(f"{path}: a folder, but not an SAE saved by sae-lens ({sae_lens.WEIGHTS} and "
                        f"{sae_lens.CONFIG})", field="file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise PackError(f"{path}: {suffix} files are pickles, which vllm-steer never loads (they can run code); "
                        + CONVERT_PICKLE, field="file")
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".svec":
        return "svec"
    if suffix in (".safetensors", ".npy", ".npz"):
        return "tensors"
    with path.open("rb") as f:  # no telling suffix: the GGUF magic, or JSON
        head = f.read(4)
    if head == gguf_control_vector.GGUF_MAGIC:
        return "gguf"
    if head[:1] == b"{":
        return "svec"
    raise PackError(f"{path}: cannot tell its format from its name or first bytes; pass --format "
                    f"({', '.join(IMPORT_FORMATS[1:])})", field="--format")


def read_vectors(path: str | Path, fmt: str = "auto", *, layer: int | None = None,
                 feature: int | None = None) -> LayerVectors:
    path = Path(path)
    if not path.exists():
        raise PackError(f"{path}: no such file or folder", field="file")
    if fmt == "auto":
        fmt = detect_format(path)  # refuses pickles
    elif path.suffix.lower() in PICKLE_SUFFIXES:  # whatever --format says
        detect_format(path)
    if fmt not in IMPORT_FORMATS[1:]:
        raise PackError(f"unknown format {fmt!r} (choose from {', '.join(IMPORT_FORMATS)})", field="--format")
    if layer is not None and fmt != "tensors":
        raise PackError("--layer applies to a tensor file holding one vector", field="--layer")
    if feature is not None and fmt != "sae":
        raise PackError("--feature applies to an SAE folder", field="--feature")
    if fmt == "gguf":
        return gguf_control_vector.read_gguf_control_vector(path)
    if fmt == "svec":
        return svec.read_svec(path)
    if fmt == "sae":
        if not sae_lens.is_sae_folder(path):
            raise PackError(f"{path}: not an SAE folder ({sae_lens.WEIGHTS} and {sae_lens.CONFIG})", field="file")
        return sae_lens.read_sae_feature(path, feature)
    return tensor_files.read_tensor_file(path, layer)


def write_vectors(pack: SteerPack, path: str | Path, fmt: str) -> Path:
    """Write ``pack``'s residual vectors in another tool's format; returns the file written."""
    path = Path(path)
    vectors = pack_residual_vectors(pack)
    hint = gguf_control_vector.model_hint_of(pack.manifest.model.architecture)
    if fmt == "gguf":
        gguf_control_vector.write_gguf_control_vector(path, vectors, hint)
    elif fmt == "svec":
        svec.write_svec(path, vectors, hint)
    else:
        raise PackError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})", field="--format")
    return path
