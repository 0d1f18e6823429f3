"""Attention heatmaps: which source subwords each target subword looked at."""

from __future__ import annotations

from pathlib import Path


def plot_attention(
    attention: list[list[float]], src_tokens: list[str], tgt_tokens: list[str], path: Path
) -> Path:
    """Saves a (target x source) attention matrix as a PNG heatmap with subword labels."""
    if not attention:
        raise ValueError("no attention weights to plot (the search returned none)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(attention)
    cols = len(attention[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * cols + 2), max(3.0, 0.4 * rows + 1.5)))
    image = ax.imshow(attention, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), src_tokens[:cols], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), tgt_tokens[:rows], fontsize=8)
    ax.set_xlabel("source subwords")
    ax.set_ylabel("target subwords")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
