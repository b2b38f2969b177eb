"""Plot a binary attention mask file the way the SparseBERT paper shows learned masks.

The overview PNG (--out) draws one large map per head when every layer holds the same mask (a
search with one mask shared by all layers), else one map per layer: the share of that layer's
heads that keep each (query i, key j) pair. Dark is kept, white is dropped (the colour bar says
so). The paper's finding, "the diagonal is the least important position", is a one-position line
that a 2-pixel rendering hides among the other stripes, so each map marks its dropped main-diagonal
pairs in red (a head that keeps its diagonal shows none), and each map's title says whether it
drops it. Under the maps: the top-left corner enlarged (share of heads keeping each pair, the
diagonal framed), then the kept fraction per diagonal offset |i - j| on a 0-1 axis with a line at
½, twice: the first offsets as bars (offset 0 red, its value printed) and every offset as a line
(mean, and per layer). The title states the finding in numbers. --pages
also writes every head of every layer, one PNG per layer (<out stem>_layer<k>.png).

    python scripts/plot_masks.py results/mask.safetensors --out results/mask.png [--pages]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import torch  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize, to_rgba  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attention_masks  # noqa: E402
import launch  # noqa: E402
from atomic_io import save_figure  # noqa: E402
from checkpoints import TORCH_FILE_MAGIC  # noqa: E402

PANEL_INCHES = 2.6  # each map's side: 260 px at the default dpi, 2 px per position at n = 128
KEPT_COLOUR, DROPPED_COLOUR = "#08306b", "#ffffff"
BINARY = ListedColormap([DROPPED_COLOUR, KEPT_COLOUR])
SHARE = "Blues"  # white (no head keeps the pair) to dark blue (every head does)
DIAGONAL_COLOUR = "#d62728"
DIAGONAL_MARK = "red: the main-diagonal pairs (i, i) dropped"
CORNER = 12  # pairs a side of the enlarged top-left corner
FIRST_OFFSETS = 16  # offsets drawn as bars: the diagonal and its neighbours, where the paper's finding lies


def _grid_shape(count: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def _draw_maps(fig: plt.Figure, grid: GridSpec, maps: torch.Tensor, titles: list[str], binary: bool) -> None:
    """Maps [k, n, n] in the first rows of `grid`, query i down and key j across, with a colour bar;
    each map's dropped main-diagonal pairs in red."""
    cols = _grid_shape(len(maps))[1]
    n = maps.shape[-1]
    ticks = [0, n // 2, n - 1]
    colours = ScalarMappable(Normalize(0.0, 1.0), BINARY if binary else SHARE)
    axes = []
    for k, (square, title) in enumerate(zip(maps, titles)):
        r, c = divmod(k, cols)
        ax = fig.add_subplot(grid[r, c])
        ax.imshow(_with_dropped_diagonal(square, colours), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        if k + cols >= len(maps):  # no map below this one
            ax.set_xlabel("key position j", fontsize=8)
        if c == 0:
            ax.set_ylabel("query position i", fontsize=8)
        axes.append(ax)
    bar = fig.colorbar(colours, ax=axes, shrink=0.6, aspect=25, pad=0.02)
    if binary:
        bar.set_ticks([0.25, 0.75], labels=["dropped", "kept"])
    else:
        bar.set_ticks([0.0, 0.5, 1.0], labels=["0: dropped\nby every head", "0.5", "1: kept\nby every head"])
        bar.set_label("share of the layer's heads keeping (i, j)", fontsize=8)
    bar.ax.tick_params(labelsize=8)


def _with_dropped_diagonal(square: torch.Tensor, colours: ScalarMappable) -> np.ndarray:
    """RGBA pixels of `square`, each (i, i) it drops (a share map: that most heads drop) in red: a
    white one-position line among white stripes is invisible at 2 pixels a position, a red one is not."""
    rgba = colours.to_rgba(square.float().numpy())
    dropped = (square.float().diagonal() < 0.5).nonzero().flatten().numpy()
    rgba[dropped, dropped] = to_rgba(DIAGONAL_COLOUR)
    return rgba


def _map_title(name: str, mask: torch.Tensor) -> str:
    """"head 3: 52% dropped, diagonal dropped": the sparsity of a binary mask [..., n, n] and what it
    does with its diagonal (the kept fraction when its heads disagree)."""
    diagonal = mask.float().diagonal(dim1=-2, dim2=-1).mean().item()
    fate = "dropped" if diagonal == 0 else "kept" if diagonal == 1 else f"{diagonal:.2f} kept"
    return f"{name}: {100 * attention_masks.sparsity(mask):.0f}% dropped, diagonal {fate}"


def _draw_first_offsets(ax: plt.Axes, mean: torch.Tensor) -> None:
    """The first offsets as bars on 0-1, the diagonal's red with its value printed, a line at ½."""
    shown = mean[:FIRST_OFFSETS].tolist()
    colours = [DIAGONAL_COLOUR] + ["#4a6fa5"] * (len(shown) - 1)
    ax.bar(range(len(shown)), shown, color=colours, width=0.8)
    for offset in range(min(2, len(shown))):
        # Upright (level ones overlap on bars of a similar height); inside a tall bar, above a short one.
        inside = shown[offset] > 0.7
        ax.annotate(f"{shown[offset]:.2f}", (offset, shown[offset]), xytext=(0, -3 if inside else 3),
                    textcoords="offset points", ha="center", va="top" if inside else "bottom", rotation=90,
                    fontsize=8, fontweight="bold", color="white" if inside else colours[offset])
    _half_line(ax)
    ax.set_xticks(range(len(shown)))
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_title(f"offsets 0-{len(shown) - 1} of 0-{len(mean) - 1} (all: right); red: the diagonal", fontsize=9)
    ax.set_xlabel("diagonal offset |i - j|  (0: a token attending to itself)", fontsize=8)
    ax.set_ylabel("kept fraction (mean over heads)", fontsize=8)


def _half_line(ax: plt.Axes) -> None:
    ax.axhline(0.5, color="gray", lw=1.0, ls="--")
    ax.text(1.0, 0.5, " ½", transform=ax.get_yaxis_transform(), va="center", fontsize=9, color="gray")
    ax.set_ylim(0.0, 1.2)
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(labelsize=7)


def _draw_all_offsets(ax: plt.Axes, kept: torch.Tensor, shared: bool) -> None:
    """Every offset: the mean over layers and heads, and each layer's mean when the layers differ."""
    num_layers, n = kept.shape[0], kept.shape[-1]
    if not shared:
        per_layer = kept.mean(dim=1)
        for layer in range(num_layers):
            ax.plot(per_layer[layer].numpy(), lw=0.7, alpha=0.6, label=f"layer {layer}" if num_layers <= 12 else None)
    ax.plot(kept.mean(dim=(0, 1)).numpy(), color="black", lw=1.8,
            label="mean over heads (every layer: one shared mask)" if shared else "mean over layers and heads")
    ax.axvspan(-0.5, min(FIRST_OFFSETS, n) - 0.5, color="gold", alpha=0.15, lw=0, label="zoomed at left")
    _half_line(ax)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(f"every offset 0-{n - 1}", fontsize=9)
    ax.set_xlabel("diagonal offset |i - j|", fontsize=8)
    ax.legend(fontsize=6, ncol=2 if shared else 4, loc="upper right")


def _draw_corner(ax: plt.Axes, mask: torch.Tensor) -> None:
    """The top-left CORNER x CORNER pairs enlarged (share of every layer's heads keeping each), the
    diagonal's cells framed in red: the finding at the size of a cell, not of a pixel."""
    share = mask.float().mean(dim=(0, 1))[:CORNER, :CORNER]
    ax.imshow(share.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
    for i in range(len(share)):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec=DIAGONAL_COLOUR, lw=1.5))
    ax.set_title(f"top-left {len(share)} × {len(share)} enlarged\n(black: every head keeps (i, j);\n"
                 f"red frames: the diagonal)", fontsize=8)
    ax.set_xticks(range(0, len(share), 4))
    ax.set_yticks(range(0, len(share), 4))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)


def _draw_offsets(fig: plt.Figure, grid: GridSpec, mask: torch.Tensor, shared: bool) -> None:
    kept = attention_masks.offset_keep_fraction(mask)  # [L, H, n]
    row = grid[-1, :].subgridspec(1, 3, width_ratios=[0.55, 1.0, 1.4], wspace=0.1)
    _draw_corner(fig.add_subplot(row[0]), mask)
    _draw_first_offsets(fig.add_subplot(row[1]), kept.mean(dim=(0, 1)))
    _draw_all_offsets(fig.add_subplot(row[2]), kept, shared)


def finding(mask: torch.Tensor) -> str:
    """The diagonal finding in numbers: the diagonal's kept fraction and in how many (layer, head)
    masks it is dropped, offset 1's, and the mean of the offsets beyond."""
    per_head = attention_masks.offset_keep_fraction(mask).flatten(0, 1)  # [L*H, n]
    heads, n = per_head.shape
    unique = "heads" if bool((mask == mask[:1]).all()) else "layer-heads"
    count = heads // mask.shape[0] if unique == "heads" else heads
    dropped = int((per_head[:count, 0] < 0.5).sum())
    mean = per_head.mean(dim=0)
    text = f"main diagonal kept {mean[0].item():.2f} (dropped in {dropped} of {count} {unique})"
    if n > 2:
        text += f"; offset 1: {mean[1].item():.2f}; offsets 2-{n - 1}: {mean[2:].mean().item():.2f}"
    return text


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
            f"{100 * attention_masks.sparsity(mask):.1f}% of the (query, key) pairs dropped\n{finding(mask)}")


def _figure(count: int, with_offsets: bool) -> tuple[plt.Figure, GridSpec]:
    rows, cols = _grid_shape(count)
    extra = [0.95] if with_offsets else []
    fig = plt.figure(figsize=(max(PANEL_INCHES * cols + 1.8, 11.0), PANEL_INCHES * (rows + sum(extra)) + 1.2),
                     layout="constrained")
    return fig, fig.add_gridspec(rows + len(extra), cols, height_ratios=[1.0] * rows + extra)


def _heads(mask: torch.Tensor) -> list[str]:
    return [_map_title(f"head {h}", m) for h, m in enumerate(mask)]


def plot_overview(mask_file: str, mask: torch.Tensor, metadata: dict, out: Path, layer_means: bool,
                  dpi: int) -> Path:
    shared = bool((mask == mask[:1]).all())
    if shared and not layer_means:
        maps, titles, binary = mask[0], _heads(mask[0]), True
        heading = f"every head (one mask shared by all {mask.shape[0]} layers)"
    else:
        maps = mask.float().mean(dim=1)
        titles = [_map_title(f"layer {k}", m) for k, m in enumerate(mask)]
        binary, heading = False, "one map per layer, its heads averaged (--pages: every head)"
    fig, grid = _figure(len(maps), with_offsets=True)
    _draw_maps(fig, grid, maps, titles, binary)
    _draw_offsets(fig, grid, mask, shared)
    fig.suptitle(f"{_title(mask_file, mask, metadata)}\n{heading}; {DIAGONAL_MARK}", fontsize=10)
    return save_figure(fig, out, dpi)


def plot_layer_page(mask_file: str, mask: torch.Tensor, metadata: dict, layer: int, out: Path, dpi: int) -> Path:
    fig, grid = _figure(mask.shape[1], with_offsets=False)
    _draw_maps(fig, grid, mask[layer], _heads(mask[layer]), binary=True)
    fig.suptitle(f"{_title(mask_file, mask, metadata)}\nlayer {layer}: "
                 f"{100 * attention_masks.sparsity(mask[layer]):.1f}% of its pairs dropped; {DIAGONAL_MARK}",
                 fontsize=10)
    return save_figure(fig, out, dpi)


def plot_mask_file(mask_file: str, out: str, layer_means: bool = False, pages: bool = False,
                   dpi: int = 100) -> list[Path]:
    """The overview PNG at `out`, then (with `pages`) one PNG per layer beside it; their paths."""
    refuse_checkpoint(Path(mask_file))
    mask, metadata = attention_masks.load_mask_file(mask_file)
    out_path = Path(out)
    written = [plot_overview(mask_file, mask, metadata, out_path, layer_means, dpi)]
    if pages:
        for layer in range(mask.shape[0]):
            page = out_path.with_name(f"{out_path.stem}_layer{layer}{out_path.suffix or '.png'}")
            written.append(plot_layer_page(mask_file, mask, metadata, layer, page, dpi))
    return written


def refuse_checkpoint(path: Path) -> None:
    """A checkpoint (.pt / .bin, or a torch.save file by another name) holds logits, not a mask: say
    how to export it, instead of safetensors' "header too large"."""
    head = b""
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(4)
    # A safetensors file starts with its header's length, whose first byte may be \x80 (a pickle's).
    torch_file = head.startswith(TORCH_FILE_MAGIC[0]) or (head.startswith(TORCH_FILE_MAGIC[1])
                                                          and path.suffix != ".safetensors")
    if path.suffix in (".pt", ".pth", ".bin") or torch_file:
        raise ValueError(f"{path} is a checkpoint, not a mask file: export its mask first with "
                         f"`python attention_masks.py export --checkpoint {path} --out "
                         f"{path.with_name('attention_mask.safetensors')}`, then plot that file")


def main(argv: list[str] | None = None) -> None:
    parser = launch.ScriptParser("plot_masks.py", "Heat-maps of a mask file + kept fraction per offset |i - j|.")
    parser.add_argument("mask_file", help=".safetensors mask file (run_pretraining.py's attention_mask.safetensors, "
                                          "or python attention_masks.py export --checkpoint ckpt_N.pt --out FILE)")
    parser.add_argument("--out", required=True, help="output PNG path (the overview)")
    parser.add_argument("--layer_means", action="store_true",
                        help="one map per layer (its heads averaged) even when every layer has the same mask")
    parser.add_argument("--pages", action="store_true", help="also one PNG per layer with every head")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (each map is 2.6 in a side)")
    args = parser.parse_args(argv)
    try:
        paths = plot_mask_file(args.mask_file, args.out, args.layer_means, args.pages, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"plot_masks.py: error: {err}\n")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
