"""The demo's summary text: what its searched masks show and what its one-seed table can conclude.

Pure functions of the run's numbers (masks, the search's last log line, the fine-tuning results),
so that the wording is tested without training anything. The noise levels are computed, not quoted:
a random mask's spread for the diagonal finding, the dev set's binomial spread for the accuracies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import attention_masks
from attention_masks import offset_keep_fraction, sparsity, sparsity_per_layer_head

# Gates with sigma(a) in [0.1, 0.9] are undecided (run_pretraining's decided_gates); below this share of
# decided gates the written mask is mostly a cut through logits the last steps' noise still moves.
MOSTLY_DECIDED = 0.5


@dataclass(frozen=True)
class Row:
    """One fine-tuned mask of the table."""

    name: str
    sparsity: float  # share of dropped entries at the fine-tuning length
    accuracy: float  # dev accuracy, a share


def shared_across_layers(mask: torch.Tensor) -> bool:
    """True when every layer of Bool[L, H, n, n] holds the same mask (one mask shared by all layers)."""
    return mask.shape[0] > 1 and bool((mask == mask[:1]).all())


def distinct_heads(mask: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The [masks, n, n] to count (a shared mask's heads once) and what one of them is called."""
    if shared_across_layers(mask):
        return mask[0], "heads"
    return mask.flatten(0, 1), "layer-heads"


def diagonal_counts(mask: torch.Tensor) -> str:
    """'Main diagonal dropped in 10 of 12 heads; offset 1 kept in 12 of 12 (one mask shared by all 6 layers).'"""
    return attention_masks.finding_text(attention_masks.mask_finding(mask)).splitlines()[0]


def offset_profile(mask: torch.Tensor, shown: int = 8) -> str:
    """Kept fraction per offset |i - j| (the first `shown`, then the mean of the rest) and of the whole mask."""
    mean = offset_keep_fraction(distinct_heads(mask)[0]).mean(dim=0)
    parts = [f"{d}: {v:.2f}" for d, v in enumerate(mean[:shown].tolist())]
    if mean.shape[0] > shown:
        parts.append(f"{shown}..{mean.shape[0] - 1}: {mean[shown:].mean().item():.2f}")
    return f"Kept fraction per offset |i - j|: {', '.join(parts)}; whole mask: {1 - sparsity(mask):.2f}."


def diagonal_gates(mask: torch.Tensor, mode: str, block_size: int) -> int:
    """How many independent gates decide the diagonal of the distinct heads: one per head for DAM_s
    (one gate per offset), one per block of the diagonal for DAM_u (one gate per pair or block)."""
    heads = distinct_heads(mask)[0].shape[0]
    return heads if mode == "dam_s" else heads * math.ceil(mask.shape[-1] / block_size)


def diagonal_verdict(mask: torch.Tensor, gates: int) -> str:
    """Whether the diagonal is kept less often than offset 1 (the paper's finding: a token's attention
    to itself matters least, to its neighbour most) by more than a random mask of the same sparsity would
    show (2 standard errors of the difference, `gates` independent gates on each of the two offsets):
    only then is it reported as a finding."""
    mean = offset_keep_fraction(distinct_heads(mask)[0]).mean(dim=0)
    diagonal, neighbour = mean[0].item(), mean[1].item()
    kept = 1 - sparsity(mask)
    noise = 2 * math.sqrt(kept * (1 - kept) * 2 / gates)
    numbers = (f"{diagonal:.2f} against {neighbour:.2f} at offset 1; a random mask of this sparsity would differ "
               f"by up to {noise:.2f}")
    if diagonal < neighbour - noise:
        return f"The diagonal is kept less often than offset 1 ({numbers}): the paper's finding."
    if diagonal > neighbour + noise:
        return f"The diagonal is kept more often than offset 1 ({numbers}): the opposite of the paper's finding."
    return f"The diagonal is kept about as often as offset 1 ({numbers}): no diagonal finding from this search."


def search_state(state: dict[str, float], step: int) -> str:
    """The search's last log line in words, with a caveat when most gates are undecided."""
    line = (f"Search state at step {step}: expected sparsity {state['expected_sparsity']:.3f}, deterministic "
            f"1[a > 0] {state['deterministic_sparsity']:.3f}, {100 * state['decided_gates']:.0f} % of gates decided "
            f"(σ(a) < 0.1 or > 0.9).")
    if state["decided_gates"] < MOSTLY_DECIDED:
        line += (" Most gates are undecided: beyond the positions clearly kept or dropped, which ones the written "
                 "mask keeps is the noise of the last steps.")
    return line


def head_sparsity(mask: torch.Tensor) -> list[str]:
    """Sparsity % per head, one row for a shared mask (its layers are identical), else per layer."""
    table = 100 * sparsity_per_layer_head(mask)
    if shared_across_layers(mask):
        table, labels = table[:1], [f"all {mask.shape[0]}"]
    else:
        labels = [str(layer) for layer in range(table.shape[0])]
    lines = ["| layer | " + " | ".join(f"h{h}" for h in range(table.shape[1])) + " |",
             "|---|" + "---:|" * table.shape[1]]
    lines += [f"| {label} | " + " | ".join(f"{v:.1f}" for v in row.tolist()) + " |"
              for label, row in zip(labels, table)]
    return lines


def dev_noise(accuracy: float, examples: int) -> float:
    """One standard error of an accuracy measured on `examples` dev sentences (binomial), a share."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / examples)


def conclusion(rows: list[Row], examples: int, steps: int) -> str:
    """The plain conclusion of a one-seed table: the best mask, and which differences the dev set's
    own sampling noise (2 standard errors of a difference of two accuracies) already covers."""
    best = max(rows, key=lambda r: r.accuracy)
    mean = sum(r.accuracy for r in rows) / len(rows)
    margin = 2 * math.sqrt(2) * dev_noise(mean, examples)
    close = [r.name for r in rows if r is not best and best.accuracy - r.accuracy <= margin]
    text = (f"{best.name} scored best ({100 * best.accuracy:.1f} % at {100 * best.sparsity:.1f} % sparsity). "
            f"One fine-tuning seed at {steps} steps on {examples} dev sentences: differences below "
            f"{100 * margin:.1f} points are within the dev set's sampling noise alone, and seed-to-seed spread, "
            f"which one seed cannot measure, adds to that. ")
    if close:
        verb = "is" if len(close) == 1 else "are"
        return text + f"{', '.join(close)} {verb} within it, so this run does not rank them."
    return text + "Every other mask is below it by more than that, though not shown beyond the seed noise."
