"""What a steer pack holds, for people (``vllm-steer pack inspect FILE``) and scripts (``--json``).

The pack is loaded and validated like any other (safetensors only, ``load_pack``); nothing else is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.pack.steer_pack import SteerPack


def pack_summary(pack: SteerPack) -> dict[str, Any]:
    """Plain JSON data: name, file, the model shape it fits, methods a request may ask for, the
    selected heads (with sigma), residual layers, probes, L2S, the fit record and the digest."""
    from vllm_steer.pack_registry import PackRegistry

    manifest = pack.manifest
    metadata = manifest.metadata
    accuracies = metadata.get("selected_val_accuracy")
    heads = []
    for i, (layer, head) in enumerate(pack.selected_heads):
        row = {"layer": layer, "head": head, "sigma": round(float(pack.head_sigmas[i]), 6)}
        if isinstance(accuracies, list) and len(accuracies) == len(pack.selected_heads):
            row["val_accuracy"] = accuracies[i]
        heads.append(row)
    residual_norms = pack.residual_vectors.norm(dim=-1).tolist() if pack.residual_vectors.numel() else []
    l2s = None
    if manifest.l2s is not None:
        record = metadata.get("l2s") if isinstance(metadata.get("l2s"), dict) else {}
        l2s = {**manifest.l2s.model_dump(),
               **{k: record[k] for k in ("val_cosine", "val_cosine_mean_s", "target", "num_prompts") if k in record},
               "mean_s_norm": round(float(pack.l2s_mean.norm()), 6)}
    condition = None
    if manifest.condition is not None:
        record = metadata.get("condition") if isinstance(metadata.get("condition"), dict) else {}
        condition = {**manifest.condition.model_dump(),
                     **{k: record[k] for k in ("val_f1", "num_prompts") if k in record}}
    source = pack.source
    return {
        "name": manifest.name,
        "file": str(source) if source else None,
        "file_bytes": source.stat().st_size if source and source.is_file() else None,
        "format_version": manifest.format_version,
        "model": manifest.model.model_dump(),
        "methods": PackRegistry(model=manifest.model).methods_of(pack),
        "num_heads_selected": manifest.num_heads_selected,
        "heads": heads,
        "residual_layers": [{"layer": int(l), "norm": round(float(n), 6)}
                            for l, n in zip(pack.residual_layers.tolist(), residual_norms)],
        "probes": {"count": int(pack.probe_weights.shape[0])} if pack.probe_weights is not None else None,
        "l2s": l2s,
        "condition": condition,
        "metadata": metadata,
        "digest": pack.digest(),
    }


def format_pack_summary(summary: dict[str, Any]) -> str:
    """``pack_summary``'s data as a few aligned lines."""
    model = summary["model"]
    lines = [("steer pack", summary["name"])]
    if summary["file"]:
        size = f", {summary['file_bytes'] / 1024:.1f} KiB" if summary["file_bytes"] is not None else ""
        lines.append(("file", f"{summary['file']}{size}"))
    lines.append(("format", f"version {summary['format_version']}"))
    family = f" (family {model['family']})" if model.get("family") else " (no family vllm-steer steers)"
    lines.append(("model", f"{model['architecture']}{family}: {model['num_layers']} layers x "
                           f"{model['num_heads']} heads "
                           f"({model['num_kv_heads']} KV heads), head_dim {model['head_dim']}, "
                           f"hidden {model['hidden_size']}"))
    lines.append(("methods", ", ".join(summary["methods"]) or "none (a condition only)"))
    heads = summary["heads"]
    if heads:
        by_layer: dict[int, list[int]] = {}
        for h in heads:
            by_layer.setdefault(h["layer"], []).append(h["head"])
        sigmas = [h["sigma"] for h in heads]
        lines.append((f"heads (K={len(heads)})", "; ".join(
            f"layer {l}: {', '.join(map(str, hs))}" for l, hs in sorted(by_layer.items()))))
        lines.append(("sigma", f"{min(sigmas):.4g} … {max(sigmas):.4g}"))
        accuracies = [h["val_accuracy"] for h in heads if "val_accuracy" in h]
        if accuracies:
            lines.append(("head val acc.", f"{min(accuracies):.3f} … {max(accuracies):.3f}"))
    else:
        lines.append(("heads", "none"))
    residual = summary["residual_layers"]
    lines.append(("residual", "none" if not residual else "layers " + ", ".join(
        f"{r['layer']} (norm {r['norm']:.4g})" for r in residual)))
    probes = summary["probes"]
    probe_text = f"{probes['count']} linear probes, one per selected head (FASB)" if probes else "none"
    if probes and isinstance(summary["metadata"].get("probe_C"), list) and summary["metadata"].get("probe_C_selection"):
        cs = ", ".join(f"{c:g}" for c in summary["metadata"]["probe_C"])
        probe_text += f"; C {cs} ({summary['metadata']['probe_C_selection']})"
    lines.append(("probes", probe_text))
    l2s = summary["l2s"]
    if l2s:
        text = (f"reads layer {l2s['read_layer']}, steers layer {l2s['steer_layer']}, width {l2s['width']}, "
                f"fitted on {l2s['prompt_format']} prompts")
        if "val_cosine" in l2s:
            text += f"; validation cosine {l2s['val_cosine']:.3f}"
            if "val_cosine_mean_s" in l2s:
                text += f" (Mean-S {l2s['val_cosine_mean_s']:.3f})"
        lines.append(("L2S", text))
    else:
        lines.append(("L2S", "none"))
    condition = summary.get("condition")
    if condition:
        text = (f"reads the input of layer {condition['layer']}, holds when the similarity is "
                f"{condition['comparison']} {condition['threshold']:g}")
        if "val_f1" in condition:
            text += f"; validation F1 {condition['val_f1']:.3f}"
        lines.append(("condition", text))
    fit = _fit_line(summary["metadata"])
    if fit:
        lines.append(("fit", fit))
    imported = summary["metadata"].get("imported_from")
    if isinstance(imported, dict):
        lines.append(("imported", f"{imported.get('format')} {imported.get('file')}: {imported.get('layer_mapping')}"))
    lines.append(("digest", f"sha256 {summary['digest']}"))
    fits = summary.get("fits_model")
    if fits is not None:
        lines.append(("fits model", f"{fits['model']}: " + ("yes" if not fits["mismatches"] else
                                                          "NO: " + "; ".join(fits["mismatches"]))))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 2}}{v}" for k, v in lines)


def _fit_line(metadata: dict) -> str:
    parts = []
    for key, label in (("source", "source"), ("dataset", "dataset"), ("num_examples", "examples"),
                       ("position", "position"), ("direction", "direction"), ("seed", "seed")):
        if key in metadata and isinstance(metadata[key], (str, int, float)):
            value = Path(metadata[key]).name if key == "dataset" else metadata[key]
            parts.append(f"{label} {value}")
    split = metadata.get("split")
    if isinstance(split, dict) and {"train", "val"} <= split.keys():
        parts.append(f"split {split['train']} train / {split['val']} val")
    return ", ".join(parts)
