"""Plot a binary attention mask file the way the SparseBERT paper shows learned masks.

One PNG: a grid of heat-maps (layers x heads, or one mean-over-heads map per layer with
--layer_means), and under it the kept fraction per diagonal offset |i - j| (mean over everything and
per layer), where the paper's "the diagonal is the least important position" shows as a dip at 0.

    python scripts/plot_masks.py results/mask.safetensors --out results/mask.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attention_masks  # noqa: E402
from atomic_io import atomic_path  # noqa: E402

MAX_GRID_PANELS = 256  # above this the layers x heads grid is unreadable: fall back to layer means


def plot_mask_file(mask_file: str, out: str, layer_means: bool = False, dpi: int = 100) -> Path:
    mask, metadata = attention_masks.load_mask_file(mask_file)
    num_layers, num_heads, n, _ = mask.shape
    if num_layers * num_heads > MAX_GRID_PANELS:
        layer_means = True
    maps = mask.float().mean(dim=1, keepdim=True) if layer_means else mask.float()
    rows, cols = (1, num_layers) if layer_means else (num_layers, num_heads)

    fig = plt.figure(figsize=(max(6.0, 1.1 * cols), 1.1 * rows + 3.2))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [2.6], hspace=0.45, wspace=0.1)
    for r in range(rows):
        for c in range(cols):
            layer, head = (c, 0) if layer_means else (r, c)
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(maps[layer, head].numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"L{layer}" if layer_means else f"H{head}", fontsize=7)
            if c == 0 and not layer_means:
                ax.set_ylabel(f"L{layer}", fontsize=7)

    kept = attention_masks.offset_keep_fraction(mask)  # [L, H, n]
    ax = fig.add_subplot(grid[rows, :])
    per_layer = kept.mean(dim=1)
    for layer in range(num_layers):
        ax.plot(per_layer[layer].numpy(), lw=0.6, alpha=0.5, label=f"L{layer}" if num_layers <= 12 else None)
    ax.plot(kept.mean(dim=(0, 1)).numpy(), color="black", lw=1.8, label="mean")
    ax.set_xlim(0, n - 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("diagonal offset |i - j|")
    ax.set_ylabel("kept fraction")
    ax.legend(fontsize=6, ncol=7, loc="upper right")

    lam = metadata.get("lambda")
    title = (f"{Path(mask_file).name}: mode={metadata.get('mode', '?')}"
             + (f", lambda={lam:g}" if isinstance(lam, (int, float)) else "")
             + (f", step={metadata['step']}" if "step" in metadata else "")
             + f", sparsity={100 * attention_masks.sparsity(mask):.1f}%"
             + (" (layer means over heads)" if layer_means else ""))
    fig.suptitle(title, fontsize=9)

    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Heat-map grid + per-offset kept fraction of a mask file.")
    parser.add_argument("mask_file", help=".safetensors mask file (attention_masks.export_mask)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--layer_means", action="store_true", help="one map per layer (mean over heads)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        path = plot_mask_file(args.mask_file, args.out, args.layer_means, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"plot_masks.py: error: {err}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
