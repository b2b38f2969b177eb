"""Plot a binary attention mask file the way the SparseBERT paper shows learned masks.

The overview PNG (--out) draws one large map per head when every layer holds the same mask (a
search with one mask shared by all layers), else one map per layer: the share of that layer's
heads that keep each (query i, key j) pair. Dark is kept, white is dropped (the colour bar says
so). Under the maps: the kept fraction per diagonal offset |i - j| (mean and per layer), where the
paper's "the diagonal is the least important position" shows as a dip at offset 0. --pages also
writes every head of every layer, one PNG per layer (<out stem>_layer<k>.png).

    python scripts/plot_masks.py results/mask.safetensors --out results/mask.png [--pages]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attention_masks  # noqa: E402
from atomic_io import save_figure  # noqa: E402

PANEL_INCHES = 2.6  # each map's side: 260 px at the default dpi, 2 px per position at n = 128
KEPT_COLOUR, DROPPED_COLOUR = "#08306b", "#ffffff"
BINARY = ListedColormap([DROPPED_COLOUR, KEPT_COLOUR])
SHARE = "Blues"  # white (no head keeps the pair) to dark blue (every head does)


def _grid_shape(count: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def _draw_maps(fig: plt.Figure, grid: GridSpec, maps: torch.Tensor, titles: list[str], binary: bool) -> None:
    """Maps [k, n, n] in the first rows of `grid`, query i down and key j across, with a colour bar."""
    cols = _grid_shape(len(maps))[1]
    n = maps.shape[-1]
    ticks = [0, n // 2, n - 1]
    axes = []
    for k, (square, title) in enumerate(zip(maps, titles)):
        r, c = divmod(k, cols)
        ax = fig.add_subplot(grid[r, c])
        image = ax.imshow(square.float().numpy(), cmap=BINARY if binary else SHARE, vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        if k + cols >= len(maps):  # no map below this one
            ax.set_xlabel("key position j", fontsize=8)
        if c == 0:
            ax.set_ylabel("query position i", fontsize=8)
        axes.append(ax)
    bar = fig.colorbar(image, ax=axes, shrink=0.6, aspect=25, pad=0.02)
    if binary:
        bar.set_ticks([0.25, 0.75], labels=["dropped", "kept"])
    else:
        bar.set_ticks([0.0, 0.5, 1.0], labels=["0: dropped\nby every head", "0.5", "1: kept\nby every head"])
        bar.set_label("share of the layer's heads keeping (i, j)", fontsize=8)
    bar.ax.tick_params(labelsize=8)


def _draw_offsets(ax: plt.Axes, mask: torch.Tensor, shared: bool) -> None:
    kept = attention_masks.offset_keep_fraction(mask)  # [L, H, n]
    num_layers, n = mask.shape[0], mask.shape[-1]
    if not shared:
        per_layer = kept.mean(dim=1)
        for layer in range(num_layers):
            ax.plot(per_layer[layer].numpy(), lw=0.7, alpha=0.6, label=f"layer {layer}" if num_layers <= 12 else None)
    ax.plot(kept.mean(dim=(0, 1)).numpy(), color="black", lw=1.8,
            label="mean over heads (every layer: one shared mask)" if shared else "mean over layers and heads")
    ax.set_xlim(0, n - 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("diagonal offset |i - j|  (0 = the main diagonal: a token attending to itself)", fontsize=8)
    ax.set_ylabel("kept fraction", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, ncol=7, loc="best")


def _title(mask_file: str, mask: torch.Tensor, metadata: dict) -> str:
    lam = metadata.get("lambda")
    details = [f"mode {metadata.get('mode', '?')}"]
    if isinstance(lam, (int, float)):
        details.append(f"λ = {lam:g}")
    if "step" in metadata:
        details.append(f"step {metadata['step']}")
    num_layers, num_heads, n, _ = mask.shape
    details.append(f"{num_layers} layers × {num_heads} heads × {n}²")
    return (f"{Path(mask_file).name}: {', '.join(details)}\n"
            f"{100 * attention_masks.sparsity(mask):.1f}% of the (query, key) pairs dropped")


def _figure(count: int, with_offsets: bool) -> tuple[plt.Figure, GridSpec]:
    rows, cols = _grid_shape(count)
    extra = [0.75] if with_offsets else []
    fig = plt.figure(figsize=(max(PANEL_INCHES * cols + 1.8, 8.0), PANEL_INCHES * (rows + sum(extra)) + 1.2),
                     layout="constrained")
    return fig, fig.add_gridspec(rows + len(extra), cols, height_ratios=[1.0] * rows + extra)


def _heads(mask: torch.Tensor) -> list[str]:
    return [f"head {h}: {100 * attention_masks.sparsity(m):.0f}% dropped" for h, m in enumerate(mask)]


def plot_overview(mask_file: str, mask: torch.Tensor, metadata: dict, out: Path, layer_means: bool,
                  dpi: int) -> Path:
    shared = bool((mask == mask[:1]).all())
    if shared and not layer_means:
        maps, titles, binary = mask[0], _heads(mask[0]), True
        heading = f"every head (one mask shared by all {mask.shape[0]} layers)"
    else:
        maps = mask.float().mean(dim=1)
        titles = [f"layer {k}: {100 * attention_masks.sparsity(m):.0f}% dropped" for k, m in enumerate(mask)]
        binary, heading = False, "one map per layer, its heads averaged (--pages: every head)"
    fig, grid = _figure(len(maps), with_offsets=True)
    _draw_maps(fig, grid, maps, titles, binary)
    _draw_offsets(fig.add_subplot(grid[-1, :]), mask, shared)
    fig.suptitle(f"{_title(mask_file, mask, metadata)}\n{heading}", fontsize=10)
    return save_figure(fig, out, dpi)


def plot_layer_page(mask_file: str, mask: torch.Tensor, metadata: dict, layer: int, out: Path, dpi: int) -> Path:
    fig, grid = _figure(mask.shape[1], with_offsets=False)
    _draw_maps(fig, grid, mask[layer], _heads(mask[layer]), binary=True)
    fig.suptitle(f"{_title(mask_file, mask, metadata)}\nlayer {layer}: "
                 f"{100 * attention_masks.sparsity(mask[layer]):.1f}% of its pairs dropped", fontsize=10)
    return save_figure(fig, out, dpi)


def plot_mask_file(mask_file: str, out: str, layer_means: bool = False, pages: bool = False,
                   dpi: int = 100) -> list[Path]:
    """The overview PNG at `out`, then (with `pages`) one PNG per layer beside it; their paths."""
    mask, metadata = attention_masks.load_mask_file(mask_file)
    out_path = Path(out)
    written = [plot_overview(mask_file, mask, metadata, out_path, layer_means, dpi)]
    if pages:
        for layer in range(mask.shape[0]):
            page = out_path.with_name(f"{out_path.stem}_layer{layer}{out_path.suffix or '.png'}")
            written.append(plot_layer_page(mask_file, mask, metadata, layer, page, dpi))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Heat-maps of a mask file + kept fraction per offset |i - j|.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mask_file", help=".safetensors mask file (attention_masks.export_mask)")
    parser.add_argument("--out", required=True, help="output PNG path (the overview)")
    parser.add_argument("--layer_means", action="store_true",
                        help="one map per layer (its heads averaged) even when every layer has the same mask")
    parser.add_argument("--pages", action="store_true", help="also one PNG per layer with every head")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        paths = plot_mask_file(args.mask_file, args.out, args.layer_means, args.pages, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"plot_masks.py: error: {err}\n")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
