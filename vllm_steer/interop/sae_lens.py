"""One decoder row of a sparse autoencoder saved by sae-lens, as a residual steering vector.

Layout (sae-lens ``SAE.save_model``): a folder with ``sae_weights.safetensors`` (``W_dec`` shaped
[d_sae, d_in]: feature f's direction is row f) and ``cfg.json``. sae-lens 6 nests ``hook_name`` and
``model_name`` under ``metadata``; earlier versions keep them at the top level (``hook_name`` or
``hook_point``).

Layer: TransformerLens hook names. ``blocks.l.hook_resid_post`` is the output of decoder layer l (our
layer l); ``blocks.l.hook_resid_pre`` is its input, the output of layer l - 1 (l = 0, the embeddings,
is refused). Other hook points (attention, MLP, ``hook_resid_mid``) are not a decoder layer's output
and are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_steer.errors import PackError
from vllm_steer.interop.layer_vectors import LayerVectors

FORMAT = "sae-lens-decoder-row"
WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def is_sae_folder(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def read_sae_feature(path: Path, feature: int | None) -> LayerVectors:
    from safetensors import SafetensorError, safe_open

    if feature is None:
        raise PackError(f"{path}: an SAE holds one direction per feature: choose one with --feature", field="--feature")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"{path / CONFIG}: not JSON ({exc})", field="file") from None
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    hook = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    match = _HOOK.match(hook or "")
    if match is None:
        raise PackError(f"{path / CONFIG}: hook {hook!r} is not a residual-stream hook (blocks.<l>.hook_resid_pre or "
                        "blocks.<l>.hook_resid_post), so its decoder rows are not residual vectors", field="file")
    block, where = int(match.group(1)), match.group(2)
    if where == "pre" and block == 0:
        raise PackError(f"{path / CONFIG}: {hook} is the embeddings, not a decoder layer's output", field="layer")
    layer = block if where == "post" else block - 1
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            if "W_dec" not in f.keys():
                raise PackError(f"{path / WEIGHTS}: no W_dec tensor", field="file")
            w_dec = f.get_tensor("W_dec")
    except (SafetensorError, OSError) as exc:
        raise PackError(f"{path / WEIGHTS}: not a readable safetensors file ({exc})", field="file") from None
    if w_dec.dim() != 2:
        raise PackError(f"{path / WEIGHTS}: W_dec has shape {tuple(w_dec.shape)}, expected [d_sae, d_in]", field="file")
    if not 0 <= feature < w_dec.shape[0]:
        raise PackError(f"{path}: --feature {feature} is outside the SAE's {w_dec.shape[0]} features", field="--feature")
    mapping = (f"{hook} -> output of decoder layer {layer}"
               + (" (the input of layer l is the output of layer l-1)" if where == "pre" else ""))
    return LayerVectors({layer: w_dec[feature].float().clone()}, FORMAT, mapping,
                        {"hook_name": hook, "feature": feature, "model_name": metadata.get("model_name")
                         or config.get("model_name"), "d_sae": int(w_dec.shape[0])})
