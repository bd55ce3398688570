"""The ITI / residual specs the parity tests run, and the HF reference's tokens for each.

Specs are written symbolically (``heads: "first3"``, ``layers: "first_layer"``) and made concrete
from the pack's own tensors; the reference reads the pack's tensors (from its file) and steers
plain HF transformers through ``reference/hf_steering.py``.
"""

from __future__ import annotations

from reference.hf_steering import greedy_generate


def symbolic_specs(heads_pack: str, residual_pack: str) -> list[dict | None]:
    """Unsteered, ITI at each position mode and on subsets of heads / layers, residual likewise."""
    return [
        None,
        {"pack": heads_pack, "method": "iti", "alpha": 3.0},
        {"pack": heads_pack, "method": "iti", "alpha": -4.0, "prompt_positions": "all"},
        {"pack": heads_pack, "method": "iti", "alpha": 5.0, "prompt_positions": "none", "heads": "first3"},
        {"pack": heads_pack, "method": "iti", "alpha": 4.0, "layers": "first_layer"},
        {"pack": residual_pack, "method": "residual", "alpha": 1.5, "prompt_positions": "all"},
        {"pack": residual_pack, "method": "residual", "alpha": -2.0, "layers": "first_layer"},
    ]


def concrete(spec: dict | None, raw: dict) -> dict | None:
    """``spec`` with its symbolic subsets replaced by real indices from ``raw[spec["pack"]]``."""
    if spec is None:
        return None
    spec = dict(spec)
    tensors = raw[spec["pack"]]
    if spec.get("heads") == "first3":
        spec["heads"] = [[int(l), int(h)] for l, h in zip(tensors["heads.layer"][:3], tensors["heads.head"][:3])]
    if spec.get("layers") == "first_layer":
        key = "heads.layer" if spec["method"] == "iti" else "residual.layer"
        spec["layers"] = [int(tensors[key].min())]
    return spec


def reference_tokens(hf, raw: dict, spec: dict | None, prompt, max_new: int, logprobs=None) -> list[int]:
    """HF greedy tokens of ``prompt`` under a concrete ITI / residual ``spec`` (None: unsteered);
    ``logprobs``, a list, receives each token's log-probability."""
    if spec is None:
        return greedy_generate(hf, prompt, max_new, logprobs=logprobs)
    tensors = raw[spec["pack"]]
    layers = set(spec.get("layers") or range(hf.config.num_hidden_layers))
    positions = spec.get("prompt_positions", "last")
    if spec["method"] == "iti":
        wanted = {tuple(h) for h in spec["heads"]} if spec.get("heads") else None
        heads = [
            (int(l), int(h), tensors["heads.direction"][i], float(tensors["heads.sigma"][i]))
            for i, (l, h) in enumerate(zip(tensors["heads.layer"], tensors["heads.head"]))
            if int(l) in layers and (wanted is None or (int(l), int(h)) in wanted)
        ]
        return greedy_generate(hf, prompt, max_new, heads=heads, alpha=spec["alpha"], prompt_positions=positions,
                               logprobs=logprobs)
    residual = {int(l): tensors["residual.vector"][i] for i, l in enumerate(tensors["residual.layer"])
                if int(l) in layers}
    return greedy_generate(hf, prompt, max_new, residual=residual, alpha=spec["alpha"], prompt_positions=positions,
                           logprobs=logprobs)
