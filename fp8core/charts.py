"""The one chart kind the logs draw: a value per op, as bars, in graph order (PNG, written atomically)."""

from __future__ import annotations

import math
import os

LABEL_CHARS = 40
"""Longer op names are shortened on the axis (their start and end kept): a TensorFlow export names
an op with its whole call path, hundreds of characters, and left no room for the bars."""


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """``name`` if it fits in ``limit`` characters, else its start and end around an ellipsis."""
    if len(name) <= limit:
        return name
    head = limit // 3
    return name[:head] + "\u2026" + name[-(limit - head - 1):]


def per_op_bar_chart(path: str, labels: list[str], values: list[float], ylabel: str, title: str,
                     colors: list[str] | str = "#4477aa", log_scale: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([short_label(label) for label in labels], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [v for v in values if math.isfinite(v)]
    if log_scale and finite and min(finite) > 0:
        ax.set_yscale("log")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, metadata={"Software": None})  # no version stamp: same run, same bytes
    plt.close(fig)
    os.replace(tmp, path)
