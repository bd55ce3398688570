"""A PNG of probe validation accuracy per (layer, head), with the selected heads outlined.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global backend is touched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def save_accuracy_heatmap(
    val_accuracy: torch.Tensor,
    selected: Sequence[tuple[int, int]],
    path: str | Path,
    title: str = "Probe validation accuracy per head",
) -> Path:
    """Write ``val_accuracy`` [L, H] as a heatmap (layers on y, heads on x, colour bar) to ``path``.

    Each (layer, head) in ``selected`` gets a red box. Parent folders are created. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    acc = torch.as_tensor(val_accuracy, dtype=torch.float32)
    if acc.dim() != 2 or acc.numel() == 0:
        raise ValueError(f"val_accuracy must be [L, H], got {tuple(acc.shape)}")
    num_layers, num_heads = acc.shape
    marks = [(int(layer), int(head)) for layer, head in selected]
    for layer, head in marks:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise IndexError(f"selected head ({layer}, {head}) is outside [{num_layers}, {num_heads}]")

    values = acc.numpy()
    width = min(4.0 + 0.3 * num_heads, 30.0)
    height = min(2.5 + 0.25 * num_layers, 30.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    low = float(min(0.5, values.min()))
    high = float(max(values.max(), low + 1e-6))
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, origin="lower", aspect="auto",
                      interpolation="nearest")
    for layer, head in marks:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1.0, 1.0, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} ({len(marks)} selected)" if marks else title)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
