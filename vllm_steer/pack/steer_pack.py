"""A steer pack: safetensors tensors plus the manifest, validated on every load and save.

Tensor names inside the file:

=====================  ===========  ====================================================
name                   shape        meaning
=====================  ===========  ====================================================
``heads.layer``        [K] int      layer of each selected head
``heads.head``         [K] int      head index (global, before tensor-parallel sharding)
``heads.direction``    [K, D]       unit steering direction per head (theta)
``heads.sigma``        [K]          std of the activations projected on the direction
``residual.layer``     [R] int      decoder layers that get a residual vector
``residual.vector``    [R, hidden]  residual (mean-difference) vector per layer
``probes.weight``      [K, D]       linear probe per selected head (optional)
``probes.bias``        [K]          probe bias (optional)
``l2s.w_in``           [W, hidden]  L2S predictor, first layer (with manifest.l2s)
``l2s.b_in``           [W]          its bias
``l2s.w_out``          [hidden, W]  second layer (no bias)
``l2s.mean``           [hidden]     Mean-S: the mean of the L2S training targets
``condition.direction``[hidden]     CAST condition direction, unit (with manifest.condition)
=====================  ===========  ====================================================

Only safetensors is ever read: no pickle, no torch.load.
"""

from __future__ import annotations

import hashlib

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from vllm_steer.errors import PackError
from vllm_steer.pack.manifest import MANIFEST_METADATA_KEY, ModelShape, PackManifest

PACK_SUFFIX = ".safetensors"
UNIT_NORM_TOLERANCE = 1e-3
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_HEAD_TENSORS = ("heads.layer", "heads.head", "heads.direction", "heads.sigma")
_RESIDUAL_TENSORS = ("residual.layer", "residual.vector")
_PROBE_TENSORS = ("probes.weight", "probes.bias")
_L2S_TENSORS = ("l2s.w_in", "l2s.b_in", "l2s.w_out", "l2s.mean")
_CONDITION_TENSOR = "condition.direction"
_KNOWN_TENSORS = set(_HEAD_TENSORS + _RESIDUAL_TENSORS + _PROBE_TENSORS + _L2S_TENSORS + (_CONDITION_TENSOR,))


@dataclass(frozen=True)
class SteerPack:
    """A validated pack. Float tensors are float32 on the CPU; index tensors are int64."""

    manifest: PackManifest
    head_layers: torch.Tensor
    head_indices: torch.Tensor
    head_directions: torch.Tensor
    head_sigmas: torch.Tensor
    residual_layers: torch.Tensor
    residual_vectors: torch.Tensor
    probe_weights: torch.Tensor | None = None
    probe_biases: torch.Tensor | None = None
    l2s_w_in: torch.Tensor | None = None
    l2s_b_in: torch.Tensor | None = None
    l2s_w_out: torch.Tensor | None = None
    l2s_mean: torch.Tensor | None = None
    condition_direction: torch.Tensor | None = None
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def selected_heads(self) -> list[tuple[int, int]]:
        return list(zip(self.head_layers.tolist(), self.head_indices.tolist()))

    def check_fits(self, model: ModelShape) -> None:
        """Raise PackError naming every field where the pack's model shape differs from ``model``."""
        problems = self.manifest.model.mismatches(model)
        if problems:
            where = f" ({self.source})" if self.source else ""
            raise PackError(
                f"steer pack {self.name!r}{where} does not fit the loaded model: " + "; ".join(problems),
                field="model",
            )

    def digest(self) -> str:
        """SHA-256 of the manifest and every tensor's name, dtype, shape and bytes: two packs with the
        same digest steer identically."""
        h = hashlib.sha256(self.manifest.model_dump_json().encode())
        for name, t in sorted(self.tensors().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "heads.layer": self.head_layers,
            "heads.head": self.head_indices,
            "heads.direction": self.head_directions,
            "heads.sigma": self.head_sigmas,
            "residual.layer": self.residual_layers,
            "residual.vector": self.residual_vectors,
        }
        if self.probe_weights is not None:
            out["probes.weight"] = self.probe_weights
            out["probes.bias"] = self.probe_biases
        if self.l2s_w_in is not None:
            out.update({"l2s.w_in": self.l2s_w_in, "l2s.b_in": self.l2s_b_in, "l2s.w_out": self.l2s_w_out,
                        "l2s.mean": self.l2s_mean})
        if self.condition_direction is not None:
            out[_CONDITION_TENSOR] = self.condition_direction
        return out


def build_pack(
    manifest: PackManifest, tensors: dict[str, torch.Tensor], source: Path | None = None
) -> SteerPack:
    """Validate ``tensors`` against ``manifest`` and return the pack; raises PackError."""
    where = str(source) if source else manifest.name

    def fail(msg: str, field: str) -> PackError:
        return PackError(f"steer pack {where}: {msg}", field=field)

    unknown = sorted(set(tensors) - _KNOWN_TENSORS)
    if unknown:
        raise fail(f"unknown tensors {unknown}", field=unknown[0])
    shape = manifest.model
    k = manifest.num_heads_selected

    def get(name: str, kind: str, required: bool = True) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            if required:
                raise fail(f"missing tensor {name!r}", field=name)
            return None
        if kind == "int":
            if t.dtype not in _INT_DTYPES:
                raise fail(f"tensor {name!r} must be an integer tensor, got {t.dtype}", field=name)
            return t.to(torch.int64).contiguous()
        if t.dtype not in _FLOAT_DTYPES:
            raise fail(f"tensor {name!r} must be a float tensor, got {t.dtype}", field=name)
        t = t.to(torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise fail(f"tensor {name!r} has non-finite values (nan or inf)", field=name)
        return t

    def expect_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
        if tuple(t.shape) != want:
            raise fail(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}", field=name)

    has_heads = k > 0 or any(n in tensors for n in _HEAD_TENSORS)
    if has_heads:
        layers, heads = get("heads.layer", "int"), get("heads.head", "int")
        directions, sigmas = get("heads.direction", "float"), get("heads.sigma", "float")
    else:
        layers = heads = torch.zeros(0, dtype=torch.int64)
        directions, sigmas = torch.zeros(0, shape.head_dim), torch.zeros(0)
    expect_shape("heads.layer", layers, (k,))
    expect_shape("heads.head", heads, (k,))
    expect_shape("heads.direction", directions, (k, shape.head_dim))
    expect_shape("heads.sigma", sigmas, (k,))
    if k:
        _check_range("heads.layer", layers, shape.num_layers, fail)
        _check_range("heads.head", heads, shape.num_heads, fail)
        pairs = set(zip(layers.tolist(), heads.tolist()))
        if len(pairs) != k:
            raise fail("heads.layer/heads.head name the same (layer, head) twice", field="heads.head")
        norms = directions.norm(dim=-1)
        bad = (norms - 1).abs() > UNIT_NORM_TOLERANCE
        if bad.any():
            i = int(bad.nonzero()[0])
            raise fail(
                f"heads.direction row {i} has norm {float(norms[i]):.6f}; directions must be unit vectors",
                field="heads.direction",
            )
        if (sigmas < 0).any():
            raise fail("heads.sigma must be >= 0", field="heads.sigma")

    r = len(manifest.residual_layers)
    if r or any(n in tensors for n in _RESIDUAL_TENSORS):
        res_layers, res_vectors = get("residual.layer", "int"), get("residual.vector", "float")
    else:
        res_layers, res_vectors = torch.zeros(0, dtype=torch.int64), torch.zeros(0, shape.hidden_size)
    expect_shape("residual.layer", res_layers, (r,))
    expect_shape("residual.vector", res_vectors, (r, shape.hidden_size))
    if res_layers.tolist() != list(manifest.residual_layers):
        raise fail("residual.layer does not match manifest.residual_layers", field="residual.layer")
    if r:
        _check_range("residual.layer", res_layers, shape.num_layers, fail)
        if len(set(manifest.residual_layers)) != r:
            raise fail("residual.layer repeats a layer", field="residual.layer")

    probe_w = get("probes.weight", "float", required=manifest.has_probes)
    probe_b = get("probes.bias", "float", required=manifest.has_probes)
    if (probe_w is None) != (probe_b is None) or (probe_w is not None and not manifest.has_probes):
        raise fail("probes.weight and probes.bias come together, with manifest.has_probes", field="has_probes")
    if probe_w is not None:
        expect_shape("probes.weight", probe_w, (k, shape.head_dim))
        expect_shape("probes.bias", probe_b, (k,))

    l2s = manifest.l2s
    if l2s is None:
        if any(n in tensors for n in _L2S_TENSORS):
            raise fail("l2s.* tensors need manifest.l2s", field="l2s")
        l2s_tensors = (None, None, None, None)
    else:
        for name in ("read_layer", "steer_layer"):
            if getattr(l2s, name) >= shape.num_layers:
                raise fail(f"l2s.{name} {getattr(l2s, name)} is not a layer of the model "
                           f"(it has {shape.num_layers})", field=f"l2s.{name}")
        l2s_tensors = tuple(get(n, "float") for n in _L2S_TENSORS)
        for name, t, want in zip(_L2S_TENSORS, l2s_tensors, (
            (l2s.width, shape.hidden_size), (l2s.width,), (shape.hidden_size, l2s.width), (shape.hidden_size,)
        )):
            expect_shape(name, t, want)
    if ("l2s" in manifest.methods or "mean_s" in manifest.methods) and l2s is None:
        raise fail("methods 'l2s' and 'mean_s' need manifest.l2s and the l2s.* tensors", field="methods")

    condition = manifest.condition
    if condition is None:
        if _CONDITION_TENSOR in tensors:
            raise fail(f"tensor {_CONDITION_TENSOR!r} needs manifest.condition", field="condition")
        condition_direction = None
    else:
        if condition.layer >= shape.num_layers:
            raise fail(f"condition.layer {condition.layer} is not a layer of the model (it has "
                       f"{shape.num_layers}; layer 0's input is the embedding, never read)", field="condition.layer")
        condition_direction = get(_CONDITION_TENSOR, "float")
        expect_shape(_CONDITION_TENSOR, condition_direction, (shape.hidden_size,))
        norm = float(condition_direction.norm())
        if abs(norm - 1) > UNIT_NORM_TOLERANCE:
            raise fail(f"{_CONDITION_TENSOR} has norm {norm:.6f}; it must be a unit vector", field=_CONDITION_TENSOR)

    if "iti" in manifest.methods and k == 0:
        raise fail("method 'iti' needs at least one selected head", field="methods")
    if "residual" in manifest.methods and r == 0:
        raise fail("method 'residual' needs at least one residual layer", field="methods")

    return SteerPack(
        manifest=manifest,
        head_layers=layers,
        head_indices=heads,
        head_directions=directions,
        head_sigmas=sigmas,
        residual_layers=res_layers,
        residual_vectors=res_vectors,
        probe_weights=probe_w,
        probe_biases=probe_b,
        l2s_w_in=l2s_tensors[0],
        l2s_b_in=l2s_tensors[1],
        l2s_w_out=l2s_tensors[2],
        l2s_mean=l2s_tensors[3],
        condition_direction=condition_direction,
        source=source,
    )


def _check_range(name: str, t: torch.Tensor, upper: int, fail) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise fail(f"{name} values must lie in [0, {upper}), got {t.tolist()}", field=name)


def save_pack(path: str | Path, pack: SteerPack) -> Path:
    """Write ``pack`` to ``path`` (a ``.safetensors`` file), validating it first."""
    path = Path(path)
    if path.suffix != PACK_SUFFIX:
        raise PackError(f"steer pack paths end in {PACK_SUFFIX}: {path}", field="path")
    checked = build_pack(pack.manifest, pack.tensors())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in checked.tensors().items()},
        str(tmp),
        metadata={MANIFEST_METADATA_KEY: checked.manifest.model_dump_json()},
    )
    tmp.replace(path)
    return path


def load_pack(path: str | Path, model: ModelShape | None = None) -> SteerPack:
    """Load and validate a pack; with ``model``, also check that it fits that model."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"steer pack not found: {path}", field="path")
    if path.suffix != PACK_SUFFIX:
        raise PackError(
            f"steer packs are safetensors files ending in {PACK_SUFFIX}; refusing {path} "
            "(pickle-based formats are never loaded)",
            field="path",
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise PackError(f"{path} is not a readable safetensors file: {exc}", field="path") from exc
    return _pack_from(metadata, tensors, path, str(path), model)


def load_pack_bytes(data: bytes, model: ModelShape | None = None, *, label: str = "the uploaded pack") -> SteerPack:
    """``load_pack`` for a pack's bytes (a live upload): safetensors only, the same checks."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or header_len > len(data) - 8:
            raise ValueError("its header length points past the end of the data")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises several types for corrupt data
        raise PackError(f"{label} is not a readable safetensors file: {exc}", field="pack") from exc
    return _pack_from(metadata, tensors, None, label, model)


def _pack_from(metadata: dict, tensors: dict, source: Path | None, label: str, model: ModelShape | None) -> SteerPack:
    raw = metadata.get(MANIFEST_METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise PackError(f"{label} has no {MANIFEST_METADATA_KEY!r} entry in its header", field="manifest")
    try:
        manifest = PackManifest.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise PackError(f"{label}: invalid manifest: {_first_error(exc)}", field="manifest") from exc
    pack = build_pack(manifest, tensors, source=source)
    if model is not None:
        pack.check_fits(model)
    return pack


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"manifest.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)

