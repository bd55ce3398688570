"""Random (but valid) steer packs for a model shape: for demos, tests and benchmarks.

Real packs come from the fit pipeline; these only need the right shapes and finite values.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from vllm_steer.pack.manifest import ConditionInfo, L2SInfo, ModelShape, PackManifest
from vllm_steer.pack.steer_pack import SteerPack, build_pack


def random_pack(
    shape: ModelShape,
    name: str,
    *,
    num_heads_selected: int = 4,
    residual_layers: Sequence[int] = (),
    with_probes: bool = False,
    sigma_scale: float = 1.0,
    residual_scale: float = 1.0,
    l2s: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> SteerPack:
    """``l2s=(read_layer, steer_layer, width)`` adds a random L2S predictor and Mean-S vector."""
    gen = torch.Generator().manual_seed(seed)
    total = shape.num_layers * shape.num_heads
    if not 0 <= num_heads_selected <= total:
        raise ValueError(f"num_heads_selected must be in [0, {total}]")
    flat = torch.randperm(total, generator=gen)[:num_heads_selected].sort().values
    directions = torch.randn(num_heads_selected, shape.head_dim, generator=gen)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    tensors = {
        "heads.layer": flat // shape.num_heads,
        "heads.head": flat % shape.num_heads,
        "heads.direction": directions,
        "heads.sigma": sigma_scale * (0.5 + torch.rand(num_heads_selected, generator=gen)),
        "residual.layer": torch.tensor(list(residual_layers), dtype=torch.int64),
        "residual.vector": residual_scale * torch.randn(len(residual_layers), shape.hidden_size, generator=gen),
    }
    if with_probes:
        tensors["probes.weight"] = torch.randn(num_heads_selected, shape.head_dim, generator=gen)
        tensors["probes.bias"] = torch.randn(num_heads_selected, generator=gen)
    methods = (["iti"] if num_heads_selected else []) + (["residual"] if residual_layers else [])
    l2s_info = None
    if l2s is not None:
        read_layer, steer_layer, width = l2s
        l2s_info = L2SInfo(read_layer=read_layer, steer_layer=steer_layer, width=width)
        d = shape.hidden_size
        tensors["l2s.w_in"] = torch.randn(width, d, generator=gen) / d**0.5
        tensors["l2s.b_in"] = 0.1 * torch.randn(width, generator=gen)
        tensors["l2s.w_out"] = residual_scale * torch.randn(d, width, generator=gen) / width**0.5
        tensors["l2s.mean"] = residual_scale * torch.randn(d, generator=gen)
        methods += ["l2s", "mean_s"]
    manifest = PackManifest(
        name=name,
        model=shape,
        methods=methods,
        num_heads_selected=num_heads_selected,
        residual_layers=list(residual_layers),
        has_probes=with_probes,
        l2s=l2s_info,
        metadata={"source": "random", "seed": seed},
    )
    return build_pack(manifest, tensors)


def with_constant_probes(pack: SteerPack, p: float, name: str | None = None) -> SteerPack:
    """``pack`` (renamed to ``name`` if given) with probes that score every token at exactly ``p``:
    weight 0 and bias logit(p), so FASB's mean P(desired) is ``p`` everywhere and a check fires
    exactly when ``p < threshold``."""
    if pack.probe_weights is None:
        raise ValueError(f"pack {pack.name!r} has no probes to replace")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    tensors = dict(pack.tensors())
    tensors["probes.weight"] = torch.zeros_like(tensors["probes.weight"])
    tensors["probes.bias"] = torch.full_like(tensors["probes.bias"], math.log(p / (1.0 - p)))
    manifest = pack.manifest if name is None else pack.manifest.model_copy(update={"name": name})
    return build_pack(manifest, tensors)


def condition_pack(shape: ModelShape, name: str, direction: torch.Tensor, layer: int, threshold: float,
                   comparison: str = "above") -> SteerPack:
    """A condition-only pack (CAST) with the given direction (normalised here) and condition point."""
    manifest = PackManifest(name=name, model=shape, methods=[], num_heads_selected=0,
                            condition=ConditionInfo(layer=layer, threshold=threshold, comparison=comparison))
    unit = direction.float() / direction.float().norm()
    return build_pack(manifest, {"condition.direction": unit})
