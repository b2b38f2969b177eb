"""Attention masks for SparseBERT: fixed sparse patterns, the Differentiable Attention Mask (DAM),
binarised mask files.

Conventions (shared with modeling.py):
  * ``M[i, j]`` true / 1.0 means query ``i`` may attend to key ``j``; all masks are bidirectional.
  * An ``AttentionMask`` module maps a sequence length ``s`` to keep values ``[L', H', s, s]`` with
    ``L'`` in {1, num_layers} and ``H'`` in {1, num_heads}; modeling.py adds ``(keep - 1) * 10000``
    to the pre-softmax scores of every layer, on top of the padding bias.
  * A query row whose every key is dropped is left as it is: all its scores move by the same -10000,
    so the softmax stays finite and the row attends, as if unmasked, over its non-padded keys. No
    pattern here produces such a row; a DAM sample can, and dropping the diagonal must stay possible
    because the paper's finding is that the diagonal is the least important position.
  * Sparsity is the fraction of zeros (the seed table's "sparsity ratio").
  * The mask is built for ``mask_seq_length`` = n tokens; shorter inputs use the top-left
    ``[s, s]`` slice, longer inputs are an error.

The mask's configuration is ``MaskConfig``: modeling.BertConfig inherits its fields, so this module
depends on nothing of modeling.py (its command line runs without it).

The method and the patterns' definitions: docs/masks.md and docs/search.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Self, TypeVar

import torch
from torch import nn

import checkpoints
from atomic_io import atomic_path, atomic_write_text, refuse_overwriting_inputs
from utils import check_json_type, describe_json_value

ConfigT = TypeVar("ConfigT", bound="MaskConfig")  # a MaskConfig or a subclass (modeling.BertConfig)

PATTERN_NAMES = ("dense", "no_diagonal", "strided", "fixed", "longformer", "logsparse", "bigbird", "star")
DAM_MODES = ("dam_u", "dam_s")
MASK_TYPES = PATTERN_NAMES + DAM_MODES + ("file",)
TEMPERATURE_SCHEDULES = ("constant", "linear", "exponential")
# Where budgeted binarisation counts its budget: over the whole mask, each layer's, or each head's.
BUDGET_SCOPES = ("global", "layer", "head")
# How a target search holds its expected sparsity s at the target t (docs/search.md compares them):
# "projection": a price mu >= 0 on density in the loss, -mu * G * (s - t) with G the number of gates, so
#   mu = 1 pushes a gate about as hard as a typical gradient; mu is raised by PRICE_RATE while a step
#   leaves s below t and lowered otherwise (scale-free: it finds the model's scale in tens of steps);
#   after each step every logit moves by one constant so that s = t exactly.
# "lagrangian": l1 (s - t) + l2 (s - t)^2 in the loss, multipliers by dual ascent at dam_multiplier_lr
#   (CoFi pruning's method); its rate must match the model's gradient noise.
TARGET_METHODS = ("projection", "lagrangian")
# The price is kept within [PRICE_FLOOR, PRICE_MAX]: beyond about one typical gradient it pushes every
# gate alike, which decides nothing and drowns the data's ranking (a run without the cap reached 1e9
# and kept the diagonal it had dropped; docs/search.md).
PRICE_RATE, PRICE_FLOOR, PRICE_MAX = 0.15, 1e-2, 1.0
# A gate counts as decided once its keep probability sigma(a) is below 0.1 or above 0.9 (|a| > 2.197).
DECIDED_LOGIT = 2.1972245773362196
# Below this share of decided gates a searched mask is reported as close to a coin flip.
UNDECIDED_SHARE = 0.5
# Which gates the L1 penalty's straight-through gradient reaches. "kept_gates": the released code's
# lambda * ||M||_1 of the hard sample, whose gradient sign(M) is 0 on a gate sampled 0, so only the
# gates kept in this sample are pulled down. "all_gates": every gate, sampled 0 or 1: at tau = 1 a pull
# stronger in expectation by 2.0x at a = 0, 5.0x at a = -2, 1.25x at a = +2 (Monte Carlo, 4M draws).
PENALTY_GRADIENTS = ("kept_gates", "all_gates")
# Unknown config keys with these prefixes are refused as a misspelt mask field: a typo would
# otherwise silently leave the field's default in place.
MASK_FIELD_PREFIXES = ("attention_mask", "mask_", "dam_", "pattern_")
# Checked before any allocation: beyond it a mask only fails later with an allocator traceback.
MAX_MASK_ENTRIES = 10**11
# The buffers a target search keeps in its mask module beside the logits: they steer the search (the
# multipliers, the sparsity its target ramps from), not the mask, so a model that searches nothing
# (fine-tuning, a lambda search) loads a target search's weights without them.
SEARCH_STATE_NAMES = ("lagrange_multipliers", "target_start")
MASK_FILE_KEY = "mask"
MASK_METADATA_KEY = "sparsebert_mask"
MASK_FILE_FORMAT = 1
# Where a budget is counted, in words (a mask file's report).
SCOPE_WORDS = {"global": "over the whole mask", "layer": "in each layer", "head": "in each head"}


# ----------------------------------------------------------------------------------------------
# Fixed patterns. Each builder returns Bool[H', n, n]: H' = 1 for a pattern shared by all heads,
# H' = num_heads where the original pattern differs per head (Fixed's summary groups, BigBird's
# random keys). Defaults reproduce the seed table's sparsity at n = 128 (sparsebert_method.md §5).
# ----------------------------------------------------------------------------------------------

def _offsets(n: int) -> torch.Tensor:
    """d[i, j] = i - j."""
    pos = torch.arange(n)
    return pos[:, None] - pos[None, :]


def _band_and_globals(n: int, window: int, global_tokens) -> torch.Tensor:
    """|i - j| <= window // 2, plus full rows and columns for the global tokens (Longformer / Star)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window={window} must be a positive odd number of keys (centre ± window//2)")
    is_global = torch.zeros(n, dtype=torch.bool)
    for t in global_tokens:
        if int(t) < 0:
            raise ValueError(f"global token position {t} must be >= 0")
        if int(t) < n:  # positions beyond n vanish, so a short mask is the top-left slice of a long one
            is_global[int(t)] = True
    band = _offsets(n).abs() <= window // 2
    return band | is_global[:, None] | is_global[None, :]


def _dense(n: int, num_heads: int) -> torch.Tensor:
    return torch.ones(1, n, n, dtype=torch.bool)


def _no_diagonal(n: int, num_heads: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)[None]


def _strided(n: int, num_heads: int, stride: int = 4) -> torch.Tensor:
    """Sparse Transformer 'strided', merged and bidirectional: |i - j| < l or (i - j) mod l == 0."""
    if stride < 1:
        raise ValueError(f"strided: stride={stride} must be >= 1")
    d = _offsets(n)
    return ((d.abs() < stride) | (d % stride == 0))[None]


def _fixed(n: int, num_heads: int, block: int = 4, summary: int = 1, num_summary_groups: int = 1) -> torch.Tensor:
    """Sparse Transformer 'fixed', bidirectional: same block of l tokens, or a summary column.

    Summary columns are the last ``summary`` positions of every block; with num_summary_groups = G > 1,
    head h uses group h % G, counted back from the block end (the paper's per-head variant, as in
    OpenAI's num_verts and DeepSpeed's num_different_global_patterns).
    """
    if block < 1 or summary < 1 or num_summary_groups < 1 or summary * num_summary_groups > block:
        raise ValueError(f"fixed: need block >= 1, summary >= 1 and summary * num_summary_groups <= block "
                         f"(got block={block}, summary={summary}, num_summary_groups={num_summary_groups})")
    pos = torch.arange(n)
    same_block = pos[:, None] // block == pos[None, :] // block
    heads = num_heads if num_summary_groups > 1 else 1
    masks = []
    for h in range(heads):
        end = block - (h % num_summary_groups) * summary
        within = pos % block
        is_summary = (within >= end - summary) & (within < end)
        masks.append(same_block | is_summary[None, :])
    return torch.stack(masks)


def _longformer(n: int, num_heads: int, window: int = 11, global_tokens=(0, 64)) -> torch.Tensor:
    """Sliding window of ``window`` keys plus global tokens (attend to and attended by everything)."""
    return _band_and_globals(n, window, global_tokens)[None]


def _logsparse(n: int, num_heads: int, local_window: int = 1) -> torch.Tensor:
    """Bidirectional LogSparse: |i - j| in {0, 1, 2, 4, 8, ...}, plus |i - j| < local_window."""
    if local_window < 1:
        raise ValueError(f"logsparse: local_window={local_window} must be >= 1")
    d = _offsets(n).abs()
    return (((d & (d - 1)) == 0) | (d < local_window))[None]


def _bigbird(n: int, num_heads: int, window: int = 3, num_global: int = 2, num_random: int = 2,
             seed: int = 0, per_head: bool = False) -> torch.Tensor:
    """Token-level BigBird: window + the first ``num_global`` tokens global + ``num_random`` random keys
    per non-global row, each drawn uniformly from all n keys (with replacement, so a row may get fewer
    distinct ones) by a CPU generator seeded with ``seed``: fixed for the life of the model, as in
    DeepSpeed. ``per_head`` gives each head its own draw (head 0's equals the shared draw)."""
    if num_global < 0 or num_random < 0:
        raise ValueError(f"bigbird: need num_global >= 0 and num_random >= 0 (got {num_global}, {num_random})")
    if num_random > n:  # more draws per row than keys only costs memory (a [heads, n, num_random] tensor)
        raise ValueError(f"bigbird: num_random={num_random} must be <= the mask length {n}")
    heads = num_heads if per_head else 1
    generator = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(0, n, (heads, n, num_random), generator=generator)
    random_keys = torch.zeros(heads, n, n, dtype=torch.bool).scatter_(-1, picks, True)
    random_keys[:, :num_global] = False  # global rows already see everything
    # global tokens at or beyond n vanish anyway; a huge num_global must not loop over them
    return _band_and_globals(n, window, range(min(num_global, n)))[None] | random_keys


def _star(n: int, num_heads: int, window: int = 3, global_tokens=(0,)) -> torch.Tensor:
    """Star-Transformer as a BERT mask: ring of 3 (non-cyclic) plus the relay token 0 ([CLS])."""
    return _band_and_globals(n, window, global_tokens)[None]


_PATTERNS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": _dense, "no_diagonal": _no_diagonal, "strided": _strided, "fixed": _fixed,
    "longformer": _longformer, "logsparse": _logsparse, "bigbird": _bigbird, "star": _star,
}
_RANDOM_PATTERNS = ("bigbird",)  # patterns whose builder takes ``seed`` (a config's pattern_seed)


def _builder_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of a pattern's builder with their defaults, plus drop_diagonal."""
    params = list(inspect.signature(_pattern_builder(name)).parameters.values())[2:]
    return {**{p.name: p.default for p in params}, "drop_diagonal": False}


def pattern_parameters(name: str) -> dict[str, Any]:
    """A pattern's ``pattern_params`` and their defaults (a random pattern's seed is ``pattern_seed``)."""
    return {key: value for key, value in _builder_parameters(name).items() if key != "seed"}


def check_pattern_params(name: str, params: dict[str, Any],
                         source: str = "bert_config: field 'pattern_params'") -> dict[str, Any]:
    """A config's ``pattern_params`` for pattern ``name`` with JSON numbers as their defaults' types
    (4.0 -> 4), or a ValueError naming ``source`` and the parameter for a key the pattern does not
    take or a value of another type than its default's (a JSON "false" is not False)."""
    if "seed" in params and name in _RANDOM_PATTERNS:
        raise ValueError(f"{source}: set the {name} seed with pattern_seed, not pattern_params['seed']")
    return _checked_parameters(name, params, pattern_parameters(name), source)


def _checked_parameters(name: str, params: dict[str, Any], allowed: dict[str, Any],
                        source: str | None) -> dict[str, Any]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{source + ': ' if source else ''}pattern {name!r} has no parameter(s) "
                         f"{', '.join(unknown)}; allowed: {', '.join(allowed)}")

    def where(key: str) -> str:
        return f"{source} entry '{key}' (pattern {name!r})" if source else f"parameter '{key}' of pattern {name!r}"

    return {key: _check_pattern_param(where(key), value, allowed[key]) for key, value in params.items()}


def _check_pattern_param(where: str, value: Any, default: Any) -> Any:
    if not isinstance(default, tuple):
        return check_json_type(where, value, type(default))
    # token positions: a JSON list of whole numbers >= 0
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list of token positions, got {describe_json_value(value)}")
    positions = tuple(check_json_type(f"{where} item", position, int) for position in value)
    if any(position < 0 for position in positions):
        raise ValueError(f"{where} items must be >= 0, got {list(positions)}")
    return positions


def _pattern_builder(name: str) -> Callable[..., torch.Tensor]:
    if name not in _PATTERNS:
        raise ValueError(f"unknown attention pattern {name!r}; choose one of {', '.join(PATTERN_NAMES)}")
    return _PATTERNS[name]


def pattern_masks(name: str, seq_len: int, num_heads: int = 1, **params: Any) -> torch.Tensor:
    """Pattern ``name`` at length ``seq_len`` as Bool[H', n, n], H' = num_heads for per-head patterns
    (fixed with num_summary_groups > 1, bigbird with per_head=True), else 1. ``params`` are the
    builder's: a config's pattern_params, and ``seed`` for a random pattern.

    ``drop_diagonal=True`` removes the main diagonal from any pattern (the paper's diagonal study).
    """
    builder = _pattern_builder(name)
    params = _checked_parameters(name, params, _builder_parameters(name), None)
    if seq_len < 1 or num_heads < 1:
        raise ValueError(f"seq_len={seq_len} and num_heads={num_heads} must be >= 1")
    drop_diagonal = params.pop("drop_diagonal", False)
    mask = builder(seq_len, num_heads, **params)
    if drop_diagonal:
        mask = mask & ~torch.eye(seq_len, dtype=torch.bool)
    return mask


def pattern_mask(name: str, seq_len: int, **params: Any) -> torch.Tensor:
    """Pattern ``name`` as Bool[n, n] (head 0 of a per-head pattern)."""
    return pattern_masks(name, seq_len, 1, **params)[0]


# ----------------------------------------------------------------------------------------------
# Measuring masks
# ----------------------------------------------------------------------------------------------

def sparsity(mask: torch.Tensor) -> float:
    """Fraction of zeros (dropped query-key pairs) over every entry of ``mask``."""
    return 1.0 - mask.bool().float().mean().item()


def _as_layers_heads(mask: torch.Tensor) -> torch.Tensor:
    """View a [n, n], [H, n, n] or [L, H, n, n] mask as bool [L, H, n, n]."""
    if mask.dim() not in (2, 3, 4) or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"expected a square mask of shape [n, n], [H, n, n] or [L, H, n, n], got {tuple(mask.shape)}")
    mask = mask.bool()
    while mask.dim() < 4:
        mask = mask[None]
    return mask


def sparsity_per_layer_head(mask: torch.Tensor) -> torch.Tensor:
    """Float[L, H] fraction of zeros of each layer's and head's n x n mask."""
    return 1.0 - _as_layers_heads(mask).float().mean(dim=(-1, -2))


def sparsity_report(mask: torch.Tensor) -> str:
    """Per-layer / per-head sparsity (%) as a text table, with head means, layer means and the total."""
    table = 100.0 * sparsity_per_layer_head(mask)
    num_layers, num_heads = table.shape
    heads = " ".join(f"{'h' + str(h):>5}" for h in range(num_heads))
    lines = [f"{'layer':>5} | {heads} |  mean"]
    lines.append("-" * len(lines[0]))
    if num_layers > 1 and bool((mask == mask[:1]).all()):  # one mask shared by every layer: one row, not N alike
        row = " ".join(f"{v:5.1f}" for v in table[0].tolist())
        return "\n".join([*lines, f"{'all ' + str(num_layers):>5} | {row} | {100.0 * sparsity(mask):5.1f}"])
    for layer in range(num_layers):
        row = " ".join(f"{v:5.1f}" for v in table[layer].tolist())
        lines.append(f"{layer:>5} | {row} | {table[layer].mean().item():5.1f}")
    lines.append("-" * len(lines[0]))
    means = " ".join(f"{v:5.1f}" for v in table.mean(dim=0).tolist())
    lines.append(f"{'mean':>5} | {means} | {100.0 * sparsity(mask):5.1f}")
    return "\n".join(lines)


def offset_keep_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Float[..., n]: fraction of kept entries on the diagonals |i - j| = 0 .. n-1 (leading dims kept).

    The paper's 'the diagonal is the least important position' shows up as a low value at offset 0.
    """
    n = mask.shape[-1]
    d = _offsets(n).abs().flatten().to(mask.device)
    counts = torch.bincount(d, minlength=n).float()
    flat = mask.float().flatten(-2)
    kept = torch.zeros(*flat.shape[:-1], n, device=mask.device).index_add_(-1, d, flat)
    return kept / counts


def mask_finding(mask: torch.Tensor, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The paper's headline check of a binary mask [..., n, n], as numbers: per (layer, head) mask the
    kept fraction of the main diagonal and of offset 1 (dropped = fewer than half kept), how many
    drop the one and keep the other, and the kept fraction per offset |i - j| averaged over them. A
    mask the same in every layer (shared, as the released code's) is counted once per head.

    ``metadata`` (a mask file's, or a search's `search_state()`) adds what the logits say, where
    present: expected and deterministic sparsity, and the share of decided gates."""
    layers = _as_layers_heads(mask)
    shared = bool((layers == layers[:1]).all())
    per_unit = offset_keep_fraction(layers[:1] if shared else layers).flatten(0, 1)  # [units, n]
    n = per_unit.shape[1]
    next_offset = per_unit[:, 1] if n > 1 else torch.zeros_like(per_unit[:, 0])
    finding = {"layers": layers.shape[0], "heads": layers.shape[1], "shared_across_layers": shared,
               "units": "heads" if shared else "layer-heads", "count": per_unit.shape[0],
               "diagonal_dropped": int((per_unit[:, 0] < 0.5).sum()), "offset1_kept": int((next_offset >= 0.5).sum()),
               "diagonal_kept_per_unit": per_unit[:, 0].tolist(), "offset1_kept_per_unit": next_offset.tolist(),
               "kept_per_offset": per_unit.mean(dim=0).tolist(), "sparsity": sparsity(layers)}
    for key in ("mode", "step", "lambda", "target_sparsity", "expected_sparsity", "deterministic_sparsity",
                "decided_gates"):
        if metadata and metadata.get(key) is not None:
            finding[key] = metadata[key]
    return finding


def finding_text(finding: dict[str, Any], offsets_shown: int = 8) -> str:
    """`mask_finding`'s numbers in a few lines, ending with a caveat when most gates are undecided."""
    count, units = finding["count"], finding["units"]
    where = f" (one mask shared by all {finding['layers']} layers)" if finding["shared_across_layers"] and \
        finding["layers"] > 1 else ""
    kept = finding["kept_per_offset"]
    shown = " ".join(f"{d}: {v:.2f}" for d, v in enumerate(kept[:offsets_shown]))
    rest = f"; {offsets_shown}..{len(kept) - 1}: {sum(kept[offsets_shown:]) / len(kept[offsets_shown:]):.2f}" \
        if len(kept) > offsets_shown else ""
    lines = [_finding_header(finding)] if "mode" in finding else []
    lines += [f"Main diagonal dropped in {finding['diagonal_dropped']} of {count} {units}; offset 1 kept in "
             f"{finding['offset1_kept']} of {count}{where}.",
             f"Kept fraction per offset |i - j|: {shown}{rest}",
             f"Sparsity of the binarised mask: {100 * finding['sparsity']:.1f} %" + _logit_sparsities(finding)]
    if "decided_gates" in finding:
        decided = finding["decided_gates"]
        lines.append(f"Decided gates (sigma(a) < 0.1 or > 0.9): {100 * decided:.1f} %")
        if decided < UNDECIDED_SHARE:
            lines.append(_undecided_caveat("target_sparsity" in finding))
    return "\n".join(lines)


def _undecided_caveat(target_search: bool) -> str:
    """What to do about a mask most of whose gates are undecided (a target search already has a budget)."""
    if target_search:
        return ("Caveat: most gates are undecided; the budget's cut runs through near-coin-flip gates: search "
                "longer (--max_steps) or on more tokens per step before trusting which positions it keeps.")
    return ("Caveat: most gates are undecided; the mask is close to a coin flip: search longer, raise "
            "--mask_learning_rate, or use --target_sparsity.")


def _finding_header(finding: dict[str, Any]) -> str:
    """Which search the finding is of: its mode, step, and λ or target sparsity."""
    facts = [f"step {finding['step']}"] if "step" in finding else []
    if "target_sparsity" in finding:
        facts.append(f"target sparsity {finding['target_sparsity']:g}")
    elif "lambda" in finding:
        facts.append(f"λ = {finding['lambda']:g}")
    return f"Finding of the {finding['mode']} mask" + (f" ({', '.join(facts)}):" if facts else ":")


def _logit_sparsities(finding: dict[str, Any]) -> str:
    parts = [f"{label} {100 * finding[key]:.1f} %" for key, label in (
        ("expected_sparsity", "expected under sampling"), ("deterministic_sparsity", "of 1[a > 0]"))
        if key in finding]
    return f" ({', '.join(parts)})" if parts else ""


def diagonal_finding(mask: torch.Tensor, metadata: dict[str, Any] | None = None) -> str:
    """`mask_finding` of a binary mask [..., n, n] as text (`finding_text`)."""
    return finding_text(mask_finding(mask, metadata))


def keep_highest(scores: torch.Tensor, sparsity_target: float, scope: str = "global") -> torch.Tensor:
    """Budgeted binarisation: Bool[L, H, n, n] keeping the highest-scoring entries of Float[L, H, n, n]
    ``scores`` (e.g. the mask logits expanded to every entry) so that exactly
    round((1 - sparsity_target) * entries) are kept in each scope: the whole mask ("global"), each
    layer ("layer") or each (layer, head) ("head"). Ties go to the lower flat index (row-major over
    layer, head, query, key), so the result is deterministic; a DAM_s gate cut by the budget keeps
    its first rows."""
    if not 0.0 <= sparsity_target <= 1.0:
        raise ValueError(f"binarisation sparsity must be in [0, 1], got {sparsity_target}")
    if scope not in BUDGET_SCOPES:
        raise ValueError(f"binarisation scope {scope!r}; allowed: {', '.join(BUDGET_SCOPES)}")
    if scores.dim() != 4:
        raise ValueError(f"expected scores of shape [L, H, n, n], got {tuple(scores.shape)}")
    groups = {"global": 1, "layer": scores.shape[0], "head": scores.shape[0] * scores.shape[1]}[scope]
    flat = scores.detach().float().reshape(groups, -1)
    kept = round((1.0 - sparsity_target) * flat.shape[1])
    # A stable descending sort keeps equal scores in index order: the tie-break is the flat index.
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :kept]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return mask.reshape(scores.shape)


def binarization_rule(config: MaskConfig) -> tuple[float | None, str]:
    """(sparsity, scope) of the budget a DAM config binarises at: dam_binarize_sparsity, else a target
    search's target; (None, scope) means the threshold 1[a > 0]."""
    sparsity_target = config.dam_binarize_sparsity
    if sparsity_target is None:
        sparsity_target = config.dam_target_sparsity
    return sparsity_target, config.dam_binarize_scope


def frozen_mask_config(config: ConfigT, searched: MaskConfig | None) -> ConfigT:
    """The DAM config that fine-tuning freezes a searched mask under: the binarisation rule the search
    wrote its mask with (``searched``, the config recorded with its logits), unless ``config`` sets its
    own dam_binarize_sparsity; no target, since fine-tuning searches nothing (so the model carries no
    search state). Another mask type comes back unchanged."""
    if config.attention_mask_type not in DAM_MODES:
        return config
    source = searched if searched is not None and config.dam_binarize_sparsity is None else config
    sparsity_target, scope = binarization_rule(source)
    return config.replace(dam_target_sparsity=None, dam_binarize_sparsity=sparsity_target, dam_binarize_scope=scope)


def is_search_state(key: str) -> bool:
    """Whether state-dict entry ``key`` is a target search's state (``SEARCH_STATE_NAMES`` of a mask
    module: ``lagrange_multipliers`` alone, or ``<prefix>.sparse_mask.lagrange_multipliers``)."""
    return (key if "." not in key else mask_entry(key)) in SEARCH_STATE_NAMES


def describe_binarization(binarization: dict[str, Any] | None) -> str:
    """One line for a mask file's recorded binarisation rule (``DifferentiableMask.binarization()``)."""
    if not binarization:
        return "binarisation: not recorded (a file written before budgets, or not from a search)"
    if binarization.get("rule") == "budget":
        scope = binarization.get("scope")
        return (f"binarisation: budget, sparsity {binarization.get('sparsity')} {SCOPE_WORDS.get(scope, scope)} "
                f"(scope {scope!r}): the highest logits kept, ties to the lower flat index")
    return f"binarisation: threshold, {binarization.get('threshold', 'sigma(a) > 0.5')}"


def block_layout(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool[..., n/b, n/b]: a block is on when any of its b x b entries is kept (what a block-sparse
    kernel would still have to compute)."""
    n = mask.shape[-1]
    if n % block_size:
        raise ValueError(f"seq len {n} is not a multiple of block_size {block_size}")
    nb = n // block_size
    blocks = mask.bool().reshape(*mask.shape[:-2], nb, block_size, nb, block_size)
    return blocks.any(dim=-1).any(dim=-2)


# ----------------------------------------------------------------------------------------------
# Mask modules
# ----------------------------------------------------------------------------------------------

class AttentionMask(nn.Module):
    """Base: ``forward(seq_len)`` -> keep values Float[L', H', s, s]; ``penalty()`` -> fp32 scalar."""

    def __init__(self, seq_len: int, num_layers: int, num_heads: int):
        super().__init__()
        self.seq_len, self.num_layers, self.num_heads = seq_len, num_layers, num_heads

    def _check_seq_len(self, seq_len: int) -> None:
        if not 1 <= seq_len <= self.seq_len:
            raise ValueError(f"input length {seq_len} exceeds the attention mask's mask_seq_length {self.seq_len}; "
                             f"set mask_seq_length >= {seq_len} in bert_config.json (or shorten the inputs)")

    def penalty(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self._device())

    def binarize(self) -> torch.Tensor:
        """Deterministic Bool[L', H', n, n] mask at the full mask_seq_length."""
        raise NotImplementedError

    def full_mask(self) -> torch.Tensor:
        """Bool[num_layers, num_heads, n, n]: ``binarize()`` broadcast over shared layers / heads."""
        mask = self.binarize()
        return mask.expand(self.num_layers, self.num_heads, self.seq_len, self.seq_len).clone()

    def describe(self) -> dict[str, Any]:
        """Metadata written into exported mask files."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        tensor = next(iter(self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")


class FixedMask(AttentionMask):
    """A fixed binary mask (a pattern or a loaded mask file): a non-persistent buffer, no parameters,
    zero penalty, identical in training and evaluation."""

    def __init__(self, mask: torch.Tensor, num_layers: int, num_heads: int, metadata: dict[str, Any]):
        mask = _as_layers_heads(mask)
        if mask.shape[0] not in (1, num_layers) or mask.shape[1] not in (1, num_heads):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {num_layers} layers x {num_heads} heads")
        super().__init__(mask.shape[-1], num_layers, num_heads)
        self.register_buffer("keep", mask.float(), persistent=False)
        self.metadata = dict(metadata)

    def forward(self, seq_len: int) -> torch.Tensor:
        self._check_seq_len(seq_len)
        return self.keep[..., :seq_len, :seq_len]

    def binarize(self) -> torch.Tensor:
        return self.keep > 0.5

    def describe(self) -> dict[str, Any]:
        return dict(self.metadata)

    def extra_repr(self) -> str:
        return f"{self.metadata.get('mode')}, shape={tuple(self.keep.shape)}, sparsity={sparsity(self.keep):.4f}"


def _gate_index(mode: str, seq_len: int, block_size: int, symmetric: bool) -> tuple[torch.Tensor, int]:
    """Long[n, n] index of the gate that controls each (i, j) entry, and the number of gates per head.

    dam_s: gate = |i//b - j//b| (one per (block) offset, a symmetric Toeplitz mask).
    dam_u: gate = (i//b, j//b) (one per (block) pair); symmetric: the unordered pair, packed upper
    triangle, so the mask and its noise are both symmetric and there are no unused logits.
    """
    nb = seq_len // block_size  # MaskConfig checks that block_size divides seq_len
    blk = torch.arange(seq_len) // block_size
    qb, kb = blk[:, None], blk[None, :]
    if mode == "dam_s":
        return (qb - kb).abs(), nb
    if symmetric:
        lo, hi = torch.minimum(qb, kb), torch.maximum(qb, kb)
        return lo * nb - lo * (lo - 1) // 2 + (hi - lo), nb * (nb + 1) // 2
    return qb * nb + kb, nb * nb


class DifferentiableMask(AttentionMask):
    """SparseBERT's Differentiable Attention Mask (DAM_u / DAM_s).

    ``mask_logits`` a: Float[L', H, P], L' = 1 when shared across layers (the released code), P gates
    per head (see ``_gate_index``). Keep probability sigma(a); init a ~ N(0, init_std^2), i.e. ~0.5.

    Training: a fresh hard Gumbel-sigmoid sample per forward, m = 1[a + G' - G'' > 0] (G' - G'' is
    Logistic(0, 1), so P(keep) = sigma(a)), with the straight-through gradient of the soft sample
    sigma((a + G' - G'') / tau). Eval mode or ``freeze()``: deterministic 1[sigma(a) > 0.5] = 1[a > 0].

    ``penalty()`` = lambda * sum of every entry of the last forward's [L', H, s, s] mask, unnormalised
    and in fp32 (the released code's L1). With a shared mask it sums the one shared [H, s, s] mask,
    as the released code did, not L copies of it. ``penalty_gradient`` (see PENALTY_GRADIENTS) says
    which gates its gradient reaches; the value is the same either way.

    Target search (``dam_target_sparsity`` t set): the penalty is instead the Lagrangian
    l1 * (s - t') + l2 * (s - t')^2 on the expected sparsity s = 1 - mean sigma(a) over every entry
    of the full mask, with t' ramped from the sparsity at the start to t over the first
    ``dam_target_warmup`` of the run (``set_progress``). The multipliers (l1, l2) rise by dual ascent
    after each applied step (``update_multipliers``); they are a persistent buffer, so a checkpoint
    resumes them exactly. The deterministic mask of a target search keeps the highest logits at
    exactly t (``keep_highest``), so what is written is the budget, whatever the last steps' noise.
    """

    def __init__(self, config: MaskConfig):
        if config.attention_mask_type not in DAM_MODES:
            raise ValueError(f"a DifferentiableMask needs attention_mask_type {' or '.join(DAM_MODES)}, "
                             f"got {config.attention_mask_type!r}")
        super().__init__(config.mask_seq_length, config.num_hidden_layers, config.num_attention_heads)
        self.mode, self.block_size = config.attention_mask_type, config.dam_block_size
        index, num_gates = _gate_index(self.mode, self.seq_len, self.block_size, config.dam_symmetric)
        self.register_buffer("gate_index", index, persistent=False)
        self.penalty_weight, self.init_std = config.dam_lambda, config.dam_init_std
        self.share_across_layers, self.symmetric = config.dam_share_across_layers, config.dam_symmetric
        self.penalty_gradient = config.dam_penalty_gradient
        self.temperature_initial = config.dam_temperature
        final = config.dam_temperature_final
        self.temperature_final = config.dam_temperature if final is None else final
        self.temperature_schedule = config.dam_temperature_schedule
        self.temperature = self.temperature_initial
        self.frozen = False
        layers = 1 if self.share_across_layers else self.num_layers
        self.mask_logits = nn.Parameter(torch.empty(layers, self.num_heads, num_gates))
        # How many entries of the full mask each gate controls: the weights of the expected sparsity.
        cells = torch.zeros(num_gates).index_add_(0, index.flatten(), torch.ones(index.numel()))
        self.register_buffer("gate_cells", cells, persistent=False)
        self.target_sparsity, self.target_warmup = config.dam_target_sparsity, config.dam_target_warmup
        self.multiplier_lr, self.target_method = config.dam_multiplier_lr, config.dam_target_method
        self.last_shift, self.sharpness, self.sharpness_final = 0.0, 1.0, config.dam_target_sharpness_final
        self.binarize_sparsity, self.binarize_scope = binarization_rule(config)
        self.current_target = self.target_sparsity
        if self.target_sparsity is not None:
            # (l1, l2) and the expected sparsity the target ramps from (NaN until the first step).
            self.register_buffer("lagrange_multipliers", torch.zeros(2))
            self.register_buffer("target_start", torch.tensor(float("nan")))
        self.reset_parameters()
        self._last_gates: torch.Tensor | None = None
        self._last_seq_len = self.seq_len

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mask_logits.normal_(0.0, self.init_std)

    # -- temperature ---------------------------------------------------------------------------
    def temperature_at(self, progress: float) -> float:
        """tau after ``progress`` in [0, 1] of training: constant, linear or exponential (geometric)
        interpolation from dam_temperature to dam_temperature_final."""
        p = min(max(float(progress), 0.0), 1.0)
        start, end = self.temperature_initial, self.temperature_final
        if self.temperature_schedule == "linear":
            return start + (end - start) * p
        if self.temperature_schedule == "exponential":
            return start * (end / start) ** p
        return start

    def set_progress(self, progress: float) -> None:
        """Anneal: set the sampling temperature (and a target search's current target) for training
        progress ``progress`` (step / total)."""
        self.temperature = self.temperature_at(progress)
        if self.target_sparsity is not None:
            self.current_target = self.target_at(progress)
            self.sharpness = self.sharpness_at(progress)

    # -- target search --------------------------------------------------------------------------
    def expected_sparsity(self, sharpness: float = 1.0) -> torch.Tensor:
        """fp32 scalar 1 - mean sigma(a / sharpness) over every entry of the full mask (differentiable):
        at sharpness 1 the sampler's expected sparsity, towards 0 the sparsity of 1[a > 0]."""
        with torch.autocast(device_type=self.mask_logits.device.type, enabled=False):
            return 1.0 - self._mean_over_entries(torch.sigmoid(self.mask_logits.float() / sharpness))

    def deterministic_sparsity(self) -> float:
        """Sparsity of 1[a > 0] over the full mask (what the logits decide, before any budget)."""
        return 1.0 - self._mean_over_entries((self.mask_logits.detach() > 0).float()).item()

    def _mean_over_entries(self, per_gate: torch.Tensor) -> torch.Tensor:
        """The mean over every entry of the full [L', H, n, n] mask of a value given per gate
        [L', H, P]: each gate weighs as many entries as it controls."""
        return (per_gate * self.gate_cells).sum() / (self.gate_cells.sum() * per_gate.shape[0] * per_gate.shape[1])

    def decided_share(self) -> float:
        """Share of gates whose keep probability sigma(a) is below 0.1 or above 0.9."""
        return (self.mask_logits.detach().abs() > DECIDED_LOGIT).float().mean().item()

    def target_at(self, progress: float) -> float:
        """The target at ``progress``: from the sparsity at the first step (recorded then, and kept
        in checkpoints) to dam_target_sparsity, linearly over the first dam_target_warmup."""
        if torch.isnan(self.target_start):
            self.target_start.fill_(self.expected_sparsity().item())
        start, share = self.target_start.item(), self.target_warmup
        ramp = 1.0 if share == 0 else min(max(progress, 0.0) / share, 1.0)
        return start + (self.target_sparsity - start) * ramp

    def sharpness_at(self, progress: float) -> float:
        """The constraint's sharpness: 1 (the sampler's expected sparsity) while the target ramps up,
        then geometrically down to dam_target_sharpness_final at the end, so that the constrained
        quantity becomes the sparsity of what is binarised, 1[a > 0]."""
        share = self.target_warmup
        hold = 1.0 if share >= 1.0 else min(max((progress - share) / (1.0 - share), 0.0), 1.0)
        return self.sharpness_final ** hold

    @torch.no_grad()
    def after_step(self) -> None:
        """A target search's update after each applied optimizer step (see TARGET_METHODS)."""
        if self.target_sparsity is None or self.frozen:
            return
        if self.target_method == "projection":
            self._update_price()
            self.last_shift = self._shift_to(self.current_target)
            self.mask_logits.add_(self.last_shift)
            return
        # Dual ascent: l1 += lr * (s - t'), l2 += lr * (s - t')^2, so the constraint's pull grows for
        # as long as the expected sparsity misses the current target.
        gap = self.expected_sparsity(self.sharpness).item() - self.current_target
        self.lagrange_multipliers.add_(torch.tensor([gap, gap * gap]) * self.multiplier_lr)

    def _update_price(self) -> None:
        """Raise the price of density while the step just taken left the sampler's expected sparsity
        below the target (the gradients want more than the budget, or gates are still undecided),
        lower it otherwise; kept as l1 = -mu. Its pull goes through the optimizer like the task's,
        so it moves the gates the data does not defend, where the projection moves all alike."""
        price = -self.lagrange_multipliers[0].item()
        if self.expected_sparsity().item() < self.current_target:
            price = min(max(price, PRICE_FLOOR) * (1.0 + PRICE_RATE), PRICE_MAX)
        else:
            price = price / (1.0 + PRICE_RATE)
        self.lagrange_multipliers[0] = -price

    def _shift_to(self, target: float) -> float:
        """The constant c for which the logits a + c have expected sparsity ``target`` (bisection:
        the expected kept fraction rises monotonically with c)."""
        logits, cells = self.mask_logits.detach().double() / self.sharpness, self.gate_cells.double()
        wanted = (1.0 - target) * cells.sum().item() * logits.shape[0] * logits.shape[1]
        low, high = -logits.max().item() - 40.0, -logits.min().item() + 40.0
        for _ in range(64):
            middle = 0.5 * (low + high)
            if (torch.sigmoid(logits + middle) * cells).sum().item() < wanted:
                low = middle
            else:
                high = middle
        return 0.5 * (low + high) * self.sharpness

    def search_state(self) -> dict[str, float]:
        """What a log line reports of the search: expected and deterministic sparsity, decided gates,
        and for a target search the current target and the multipliers."""
        state = {"expected_sparsity": self.expected_sparsity().item(),
                 "deterministic_sparsity": self.deterministic_sparsity(), "decided_gates": self.decided_share()}
        if self.target_sparsity is not None:
            l1, l2 = self.lagrange_multipliers.tolist()
            state.update(target_sparsity=self.current_target, lagrange_l1=l1, lagrange_l2=l2,
                         target_shift=self.last_shift, constraint_sharpness=self.sharpness)
        return state

    # -- sampling -------------------------------------------------------------------------------
    def freeze(self) -> "DifferentiableMask":
        """Fix the mask at 1[sigma(a) > 0.5] for fine-tuning: no noise, logits stop learning."""
        self.frozen = True
        self.mask_logits.requires_grad_(False)
        return self

    def sample_gates(self) -> torch.Tensor:
        """Float32[L', H, P] gate values: a straight-through hard sample in training, else deterministic."""
        with torch.autocast(device_type=self.mask_logits.device.type, enabled=False):
            logits = self.mask_logits.float()
            if self.frozen or not self.training:
                return (logits > 0).float()  # a budgeted mask is applied by forward
            u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
            noisy = logits + torch.log(u) - torch.log1p(-u)  # + Logistic(0, 1) = G' - G''
            soft = torch.sigmoid(noisy / self.temperature)
            hard = (noisy > 0).float()
            return hard + (soft - soft.detach())  # exactly hard forward, soft gradient backward

    def forward(self, seq_len: int) -> torch.Tensor:
        self._check_seq_len(seq_len)
        if self.binarize_sparsity is not None and (self.frozen or not self.training):
            self._last_gates = None
            return self.binarize()[..., :seq_len, :seq_len].float()
        gates = self.sample_gates()
        self._last_gates, self._last_seq_len = gates, seq_len
        return gates[:, :, self.gate_index[:seq_len, :seq_len]]

    def penalty(self) -> torch.Tensor:
        """lambda * sum(M) of the last forward's mask, fp32; Sum over cells = Sum over gates of gate x
        (number of cells it controls), which is exact and avoids keeping the expanded mask."""
        if self._last_gates is None:
            return torch.zeros((), dtype=torch.float32, device=self.mask_logits.device)
        if self.target_sparsity is not None:
            l1, l2 = self.lagrange_multipliers
            if self.target_method == "projection":
                return l1 * self.expected_sparsity() * self.mask_logits.numel()
            gap = self.expected_sparsity(self.sharpness) - self.current_target
            return l1 * gap + l2 * gap * gap
        with torch.autocast(device_type=self.mask_logits.device.type, enabled=False):
            index = self.gate_index[:self._last_seq_len, :self._last_seq_len].flatten()
            # index_add, not bincount: bincount's output size depends on the data (a host sync).
            cells = torch.zeros(self.mask_logits.shape[-1], device=index.device).index_add_(
                0, index, torch.ones(index.shape, device=index.device))
            gates = self._last_gates.float()
            if self.penalty_gradient == "kept_gates":
                # Same value (the hard sample is 0 or 1); the gradient of a gate sampled 0 is zeroed.
                gates = gates * (gates.detach() > 0)
            return self.penalty_weight * (gates * cells).sum()

    def binarize(self) -> torch.Tensor:
        """1[a > 0], or with a budget (dam_binarize_sparsity, else a target search's target) the
        highest logits at exactly that sparsity in dam_binarize_scope."""
        logits = self.mask_logits.detach()[:, :, self.gate_index]
        if self.binarize_sparsity is None:
            return logits > 0
        return keep_highest(logits, self.binarize_sparsity, self.binarize_scope)

    def binarization(self) -> dict[str, Any]:
        """The rule that made ``binarize()``'s mask, for a mask file's metadata."""
        if self.binarize_sparsity is None:
            return {"rule": "threshold", "threshold": "sigma(a) > 0.5"}
        return {"rule": "budget", "scope": self.binarize_scope, "sparsity": self.binarize_sparsity}

    def describe(self) -> dict[str, Any]:
        search = {"lambda": self.penalty_weight} if self.target_sparsity is None else {
            "target_sparsity": self.target_sparsity, "target_warmup": self.target_warmup,
            "target_method": self.target_method, "target_sharpness_final": self.sharpness_final,
            "lagrange_multipliers": self.lagrange_multipliers.tolist()}
        return {"mode": self.mode, **search, "temperature": self.temperature,
                "temperature_schedule": self.temperature_schedule, "share_across_layers": self.share_across_layers,
                "symmetric": self.symmetric, "block_size": self.block_size, "init_std": self.init_std,
                "penalty_gradient": self.penalty_gradient, "binarization": self.binarization(),
                "expected_sparsity": self.expected_sparsity().item(),
                "deterministic_sparsity": self.deterministic_sparsity(), "decided_gates": self.decided_share()}

    def extra_repr(self) -> str:
        return (f"{self.mode}, logits={tuple(self.mask_logits.shape)}, lambda={self.penalty_weight}, "
                f"tau={self.temperature:g}, block_size={self.block_size}, frozen={self.frozen}")


# ----------------------------------------------------------------------------------------------
# The mask's configuration, and the mask module it builds
# ----------------------------------------------------------------------------------------------

@dataclass
class MaskConfig:
    """What decides the attention mask: the [num_hidden_layers, num_attention_heads, n, n] grid it
    covers (n = mask_seq_length) and the fields of its mode. Each field is a flat key of
    bert_config.json with its default here and its JSON type in its annotation; modeling.BertConfig
    inherits them, so they are declared and validated here only. Errors name the field, one line."""

    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    attention_mask_type: str = "dense"
    mask_seq_length: int = 128
    dam_lambda: float = 0.0
    dam_temperature: float = 1.0
    dam_temperature_final: float | None = None
    dam_temperature_schedule: str = "constant"
    dam_init_std: float = 1e-3
    dam_share_across_layers: bool = False
    dam_symmetric: bool = False
    dam_block_size: int = 1
    dam_penalty_gradient: str = "kept_gates"
    dam_target_sparsity: float | None = None
    dam_target_warmup: float = 0.5
    dam_target_method: str = "projection"
    dam_target_sharpness_final: float = 0.1
    dam_multiplier_lr: float = 1.0
    dam_binarize_sparsity: float | None = None
    dam_binarize_scope: str = "global"
    attention_mask_file: str | None = None
    pattern_params: dict = field(default_factory=dict)
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        """Every field, a subclass's too, as its annotated JSON type (None only where annotated)."""
        for name, (expected, optional) in _json_types(type(self)).items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            setattr(self, name, check_json_type(f"bert_config: field '{name}'", value, expected))

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, name) not in allowed:
            raise ValueError(f"bert_config field '{name}' is {getattr(self, name)!r}; allowed: {', '.join(allowed)}")

    def _check_values(self) -> None:
        self._check_grid()
        self._check_choice("attention_mask_type", MASK_TYPES)
        self._check_choice("dam_temperature_schedule", TEMPERATURE_SCHEDULES)
        self._check_choice("dam_penalty_gradient", PENALTY_GRADIENTS)
        self._check_choice("dam_binarize_scope", BUDGET_SCOPES)
        self._check_choice("dam_target_method", TARGET_METHODS)
        self._check_dam_numbers()
        self._check_budget()
        if self.attention_mask_type == "file" and not self.attention_mask_file:
            raise ValueError("bert_config: attention_mask_type 'file' needs 'attention_mask_file' (a mask file "
                             "written by run_pretraining.py --export_mask)")
        if self.attention_mask_type in PATTERN_NAMES and self.attention_mask_type != "dense":
            self.pattern_params = check_pattern_params(self.attention_mask_type, self.pattern_params)

    def _check_grid(self) -> None:
        """Layers, heads, length and DAM blocks: positive, blocks tiling the length, and a mask small
        enough to allocate (checked before it is)."""
        for name in ("num_hidden_layers", "num_attention_heads", "mask_seq_length", "dam_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bert_config field '{name}' must be > 0, got {getattr(self, name)}")
        if self.mask_seq_length % self.dam_block_size:
            raise ValueError(f"bert_config field 'dam_block_size' ({self.dam_block_size}) must divide "
                             f"'mask_seq_length' ({self.mask_seq_length})")
        entries = self.num_hidden_layers * self.num_attention_heads * self.mask_seq_length**2
        if self.attention_mask_type != "dense" and entries > MAX_MASK_ENTRIES:
            raise ValueError(f"bert_config: the attention mask would have {entries:.3g} entries (limit "
                             f"{MAX_MASK_ENTRIES:.0e}); lower 'mask_seq_length' ({self.mask_seq_length})")

    def _check_dam_numbers(self) -> None:
        if self.dam_lambda < 0:
            raise ValueError(f"bert_config field 'dam_lambda' must be >= 0 (e.g. 1e-4 ... 1e-1), got {self.dam_lambda}")
        if self.dam_temperature <= 0 or (self.dam_temperature_final is not None and self.dam_temperature_final <= 0):
            raise ValueError("bert_config fields 'dam_temperature' / 'dam_temperature_final' must be > 0")
        if self.dam_init_std < 0:
            raise ValueError(f"bert_config field 'dam_init_std' must be >= 0, got {self.dam_init_std}")

    def _check_budget(self) -> None:
        """A target search's fields: sparsities strictly inside (0, 1), a warm-up share in [0, 1]."""
        for name in ("dam_target_sparsity", "dam_binarize_sparsity"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"bert_config field '{name}' must be in (0, 1) (e.g. 0.9: keep 10 % of the "
                                 f"entries) or null, got {value}")
        if not 0.0 <= self.dam_target_warmup <= 1.0:
            raise ValueError(f"bert_config field 'dam_target_warmup' is a share of the run's steps in [0, 1], "
                             f"got {self.dam_target_warmup}")
        if not 0.0 < self.dam_target_sharpness_final <= 1.0:
            raise ValueError(f"bert_config field 'dam_target_sharpness_final' must be in (0, 1] (1: constrain the "
                             f"sampler's expected sparsity to the end), got {self.dam_target_sharpness_final}")
        if not self.dam_multiplier_lr > 0:
            raise ValueError(f"bert_config field 'dam_multiplier_lr' must be > 0, got {self.dam_multiplier_lr}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The fields of ``cls`` in ``data`` (a bert_config.json's); the model's other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                refuse_unknown_mask_field(key)
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Self:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist: pass --config_file pointing at a "
                                    f"bert_config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path} is not valid JSON ({exc}); fix the file") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object of BERT fields")
        return cls.from_dict(data)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str) -> Self | None:
        """The config a checkpoint records as a JSON string under "config" (run_pretraining.py's, with
        the run's command-line overrides applied, which no bert_config.json holds), or None."""
        recorded = checkpoint.get(checkpoints.CONFIG)
        if not isinstance(recorded, str):
            return None
        try:
            return cls.from_dict(json.loads(recorded))
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"checkpoint {source} records an unreadable config ({err})") from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some fields changed (command-line overrides)."""
        return dataclasses.replace(self, **changes)


def refuse_unknown_mask_field(key: str) -> None:
    """Raise for a key that looks like a mask field but is none (see MASK_FIELD_PREFIXES)."""
    known = sorted(f.name for f in dataclasses.fields(MaskConfig) if f.name.startswith(MASK_FIELD_PREFIXES))
    if key.startswith(MASK_FIELD_PREFIXES) and key not in known:
        raise ValueError(f"bert_config: unknown attention-mask field '{key}'; known fields: {', '.join(known)}")


@functools.cache
def _json_types(cls: type) -> dict[str, tuple[type, bool]]:
    """name -> (JSON type, may be None) of each field of dataclass ``cls``, read from its annotations."""
    hints = typing.get_type_hints(cls)
    types = {}
    for f in dataclasses.fields(cls):
        hint, args = hints[f.name], typing.get_args(hints[f.name])
        optional = type(None) in args
        if optional:
            (hint,) = (arg for arg in args if arg is not type(None))
        types[f.name] = (typing.get_origin(hint) or hint, optional)
    return types


def build_attention_mask(config: MaskConfig) -> AttentionMask | None:
    """The mask module ``config`` describes (a BertConfig is one), or None for dense attention."""
    kind, n = config.attention_mask_type, config.mask_seq_length
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if kind == "dense":
        return None
    if kind == "file":
        return load_mask_module(config.attention_mask_file, n, layers, heads)
    if kind in DAM_MODES:
        return DifferentiableMask(config)
    metadata = {"mode": kind, "pattern_params": dict(config.pattern_params)}
    params = dict(config.pattern_params)
    if kind in _RANDOM_PATTERNS:
        params["seed"] = metadata["pattern_seed"] = config.pattern_seed
    return FixedMask(pattern_masks(kind, n, heads, **params), layers, heads, metadata)


def gate_layout(config: MaskConfig) -> dict[str, Any]:
    """The config fields that say which layer, head and (i, j) entries each DAM logit gates: logits
    searched under one layout mean another mask under any other, even where their shape agrees."""
    layout = {name: getattr(config, name) for name in (
        "attention_mask_type", "mask_seq_length", "dam_block_size", "dam_share_across_layers",
        "num_hidden_layers", "num_attention_heads")}
    if config.attention_mask_type == "dam_u":  # dam_s gates are symmetric whatever the flag
        layout["dam_symmetric"] = config.dam_symmetric
    return layout


def mask_identity(config: MaskConfig) -> dict[str, Any]:
    """The config fields that decide which mask a model attends under: a DAM mode's gate layout, a
    pattern's name, length and parameters, a mask file's path, or just "dense"."""
    kind = config.attention_mask_type
    if kind in DAM_MODES:
        return gate_layout(config)
    if kind == "file":
        return {"attention_mask_type": kind, "attention_mask_file": config.attention_mask_file}
    if kind == "dense":
        return {"attention_mask_type": kind}
    return {"attention_mask_type": kind, "mask_seq_length": config.mask_seq_length,
            "pattern_params": config.pattern_params, "pattern_seed": config.pattern_seed}


def differing_fields(theirs: dict[str, Any], ours: dict[str, Any], label: str) -> list[str]:
    """`name=<theirs> (<label>) vs <ours>` for each field both hold with other values."""
    return [f"{name}={theirs[name]!r} ({label}) vs {ours[name]!r}"
            for name in theirs if name in ours and theirs[name] != ours[name]]


def load_mask_module(path: str | os.PathLike, seq_len: int, num_layers: int, num_heads: int) -> FixedMask:
    """A frozen FixedMask from a mask file, checked against the model's layers, heads and length."""
    mask, metadata = load_mask_file(path)
    layers, heads, n, _ = mask.shape
    if layers not in (1, num_layers) or heads not in (1, num_heads) or n != seq_len:
        raise ValueError(f"mask file {path} holds a mask of shape {list(mask.shape)}; this model needs "
                         f"[{num_layers}, {num_heads}, {seq_len}, {seq_len}] (num_hidden_layers, num_attention_heads, "
                         f"mask_seq_length; 1 layer or 1 head is broadcast)")
    metadata = {**metadata, "source_file": str(path), "source_mode": metadata.get("mode"), "mode": "file"}
    return FixedMask(mask, num_layers, num_heads, metadata)


# ----------------------------------------------------------------------------------------------
# Mask files: <name>.safetensors (bool "mask" [L, H, n, n], metadata as JSON inside) plus a
# human-readable <name>.json sidecar with the same metadata. Loading reads only the .safetensors.
# ----------------------------------------------------------------------------------------------

def _check_mask_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"mask file {path} must end in .safetensors")
    return path


def mask_statistics(mask: torch.Tensor) -> dict[str, Any]:
    table = sparsity_per_layer_head(mask)
    return {"shape": list(mask.shape), "seq_len": mask.shape[-1], "sparsity": sparsity(mask),
            "sparsity_per_layer": table.mean(dim=1).tolist(), "sparsity_per_head": table.tolist()}


def _refuse_replacing_unrelated_file(sidecar: Path, mask_path: Path) -> None:
    """The sidecar name <stem>.json can be another file (d/config.safetensors -> d/config.json):
    replace only a sidecar an export wrote, recognised by its format tag."""
    if not sidecar.exists():
        return
    try:
        previous = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        previous = None
    if not isinstance(previous, dict) or previous.get("format") != MASK_FILE_FORMAT:
        raise ValueError(f"mask file {mask_path} would replace {sidecar}, which is not a mask sidecar "
                         f"(its metadata JSON); choose another mask file name")


def save_mask_file(path: str | os.PathLike, mask: torch.Tensor,
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write bool ``mask`` [L, H, n, n] and its metadata (user fields + sparsity statistics) atomically.
    Returns the metadata written."""
    from safetensors.torch import save_file

    path = _check_mask_path(path)
    if mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"a mask file holds a square [layers, heads, n, n] mask, got shape {tuple(mask.shape)}")
    mask = mask.detach().bool().cpu().contiguous()
    meta = {**(metadata or {}), **mask_statistics(mask), "format": MASK_FILE_FORMAT}
    try:
        text = json.dumps(meta, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"mask metadata must be JSON-serialisable: {err}") from None
    _refuse_replacing_unrelated_file(path.with_suffix(".json"), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({MASK_FILE_KEY: mask}, str(tmp), metadata={MASK_METADATA_KEY: text})
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load_mask_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(bool mask [L, H, n, n], metadata) from a file written by ``save_mask_file``; no pickle."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} not found (write one with attention_masks.export_mask "
                                f"or `python attention_masks.py export`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, header = list(f.keys()), f.metadata() or {}
            mask = f.get_tensor(MASK_FILE_KEY) if MASK_FILE_KEY in keys else None
    except Exception as err:  # safetensors raises several error types for a corrupt header
        raise ValueError(f"mask file {path} is not a readable safetensors file: {err}") from None
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"mask file {path} must hold a bool tensor {MASK_FILE_KEY!r} of shape [layers, heads, n, n]")
    try:
        metadata = json.loads(header.get(MASK_METADATA_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"mask file {path} has corrupt metadata: {err}") from None
    return mask, metadata


def export_mask(model_or_mask: nn.Module, path: str | os.PathLike, **metadata: Any) -> dict[str, Any]:
    """Binarise a model's (or mask module's) mask by its rule (1[sigma(a) > 0.5], or a DAM mask's
    budget) and write it as a mask file [num_layers, num_heads, n, n]; ``metadata`` (e.g. step=...) is
    added to the module's own, which records the rule."""
    module = mask_module(model_or_mask)
    if module is None:
        raise ValueError("the model has no attention mask to export (attention_mask_type is 'dense')")
    return save_mask_file(path, module.full_mask(), {**module.describe(), **metadata})


# ----------------------------------------------------------------------------------------------
# The mask's state on a model: the one place that knows the mask module's name
# ----------------------------------------------------------------------------------------------

# The attribute BERT (modeling.BertModel) holds its mask module under: each of the mask's state-dict
# entries is named `<model prefix>sparse_mask.<entry>`, e.g. bert.sparse_mask.mask_logits.
MASK_MODULE = "sparse_mask"
MASK_LOGITS = "mask_logits"


def mask_module(model: nn.Module) -> AttentionMask | None:
    """The attention-mask module of ``model`` (a BERT model, one under a DDP or torch.compile wrapper,
    or a mask module itself), or None: dense attention has none."""
    return next((module for module in model.modules() if isinstance(module, AttentionMask)), None)


def mask_entry(key: str) -> str | None:
    """The name inside the mask module of state-dict entry ``key`` (``bert.sparse_mask.mask_logits`` ->
    ``mask_logits``), or None for an entry of any other module."""
    module, _, name = key.rpartition(".")
    return name if module.rpartition(".")[2] == MASK_MODULE else None


def is_mask_state(key: str) -> bool:
    """Whether state-dict entry ``key`` belongs to the attention mask (its logits, a search's state)."""
    return mask_entry(key) is not None


def mask_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention mask's entries of a model's state dict, under their names inside the mask module
    (``mask_logits``, ``lagrange_multipliers``, ...): what the module's ``load_state_dict`` takes."""
    return {mask_entry(key): value for key, value in state_dict.items() if is_mask_state(key)}


def without_mask_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict without the attention mask's entries (the mask starts fresh, or unused)."""
    return {key: value for key, value in state_dict.items() if not is_mask_state(key)}


def mask_logits_key(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The full name of a DAM search's mask logits in a model's state dict, or None when it holds none."""
    return next((key for key in state_dict if mask_entry(key) == MASK_LOGITS), None)


# ----------------------------------------------------------------------------------------------
# Command line: pattern table, mask-file report, export from a checkpoint
# ----------------------------------------------------------------------------------------------

def _read_checkpoint(checkpoint: str) -> dict[str, Any]:
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: pass --checkpoint the ckpt_<step>.pt "
                                f"written by the DAM search run")
    state = checkpoints.safe_torch_load(checkpoint)
    return state if isinstance(state, dict) else {}


def _search_config(state: dict[str, Any], checkpoint: str, config_path: str | None) -> tuple[MaskConfig, str]:
    """The mask config the search ran with, and where it came from. run_pretraining.py records it in
    the checkpoint with its command-line overrides applied (--attention_mask_type, --lamb), which a
    bert_config.json does not hold; --config is for checkpoints that record none."""
    recorded = MaskConfig.from_checkpoint(state, checkpoint)
    if recorded is not None:
        return recorded, f"the config recorded in {checkpoint}"
    if config_path is None:
        raise ValueError(f"checkpoint {checkpoint} records no config: pass --config, the search run's bert_config.json")
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"--config {config_path} not found: pass the search run's bert_config.json")
    return MaskConfig.from_json_file(config_path), config_path


def export_from_checkpoint(checkpoint: str, config_path: str | None, out: str, step: int | None,
                           sparsity_target: float | None = None, scope: str | None = None) -> dict[str, Any]:
    """Write the mask of a DAM search checkpoint; ``step`` (None: the checkpoint's number) is recorded.
    ``sparsity_target`` / ``scope`` (--sparsity / --scope) replace the search's own binarisation rule."""
    inputs = [("--checkpoint", checkpoint), ("--config", config_path)]
    refuse_overwriting_inputs(out, inputs, "--out")
    refuse_overwriting_inputs(Path(out).with_suffix(".json"), inputs, "the sidecar of --out")
    state = _read_checkpoint(checkpoint)
    config, config_source = _search_config(state, checkpoint, config_path)
    if config.attention_mask_type not in DAM_MODES:
        raise ValueError(f"{config_source} sets attention_mask_type={config.attention_mask_type!r}; "
                         f"export needs dam_u or dam_s")
    module = DifferentiableMask(_with_budget(config, sparsity_target, scope, config_source))
    extra = {"source_checkpoint": str(checkpoint)}
    step = checkpoints.checkpoint_number(state, checkpoint) if step is None else step
    if step is not None:
        extra["step"] = step
    _load_searched_mask(module, state.get(checkpoints.MODEL, state), checkpoint, config_source)
    return export_mask(module, out, **extra)


def _with_budget(config: MaskConfig, sparsity_target: float | None, scope: str | None, source: str) -> MaskConfig:
    """The search's config binarising at --sparsity and in --scope where given, else by its own rule."""
    if sparsity_target is None and scope is not None and binarization_rule(config)[0] is None:
        raise ValueError(f"--scope {scope} needs --sparsity: {source} binarises at 1[a > 0], which has no budget "
                         f"to scope; pass --sparsity S (e.g. 0.9) as well")
    changes: dict[str, Any] = {"dam_binarize_sparsity": sparsity_target, "dam_binarize_scope": scope}
    return config.replace(**{name: value for name, value in changes.items() if value is not None})


def _load_searched_mask(module: DifferentiableMask, state: dict[str, Any], checkpoint: str, config_source: str) -> None:
    """The checkpoint's mask logits into ``module``, with a target search's state where both hold it
    (so the file's metadata reports the search's multipliers, not fresh zeros)."""
    saved = mask_state(state)
    if MASK_LOGITS not in saved:
        raise ValueError(f"checkpoint {checkpoint} has no '*{MASK_MODULE}.{MASK_LOGITS}' (not a DAM search run)")
    logits = saved[MASK_LOGITS]
    if logits.shape != module.mask_logits.shape:
        raise ValueError(f"checkpoint {checkpoint}: mask_logits shape {list(logits.shape)} does not match "
                         f"{list(module.mask_logits.shape)} from {config_source}")
    module.load_state_dict({name: saved[name] for name in module.state_dict() if name in saved}, strict=False)


def _print_patterns(seq_len: int) -> None:
    """Each pattern's sparsity at n = seq_len under its default pattern_params (and pattern_seed)."""
    print(f"sparsity at mask_seq_length n = {seq_len}, under each pattern's default config fields:")
    for name in PATTERN_NAMES:
        fields = f"pattern_params {json.dumps(pattern_parameters(name))}"
        if name in _RANDOM_PATTERNS:
            fields += f"  pattern_seed {MaskConfig().pattern_seed}"
        print(f"{name:12s} {100 * sparsity(pattern_mask(name, seq_len)):6.2f}%  {fields}")


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag or value is one line naming it (its subcommands' parsers are of this class too)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _budget_sparsity(text: str) -> float:
    """--sparsity: the share of entries to drop, strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a sparsity: pass the share of attention entries to drop, "
                                         f"strictly between 0 and 1 (e.g. --sparsity 0.9 keeps 10 %)")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineParser(prog="attention_masks.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patterns", help="print every pattern's sparsity at --seq_len (mask_seq_length)")
    p.add_argument("--seq_len", type=int, default=MaskConfig().mask_seq_length)
    p = sub.add_parser("report", help="print a mask file's per-layer / per-head sparsity table and its finding "
                                      "(diagonal, offset 1, kept fraction per offset, decided gates)")
    p.add_argument("mask_file")
    p = sub.add_parser("export", help="binarise the DAM logits of a checkpoint into a mask file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", default=None,
                   help="bert_config.json of the search run; only read when the checkpoint records no config "
                        "(run_pretraining.py's do, with their command-line overrides)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--step", type=int, default=None,
                   help="step to record in the mask file (default: the checkpoint's number, N of ckpt_<N>.pt)")
    p.add_argument("--sparsity", type=_budget_sparsity, default=None,
                   help="binarise at exactly this sparsity, keeping the highest logits (default: the search's own "
                        "rule: its dam_binarize_sparsity or target, else 1[a > 0])")
    p.add_argument("--scope", choices=BUDGET_SCOPES, default=None,
                   help="where --sparsity is counted: over the whole mask, in each layer or in each head (default: "
                        "the search's dam_binarize_scope)")
    args = parser.parse_args(argv)
    if args.command == "patterns":
        _print_patterns(args.seq_len)
    elif args.command == "report":
        mask, metadata = load_mask_file(args.mask_file)
        print(json.dumps({k: v for k, v in metadata.items() if not k.startswith("sparsity_per")}, sort_keys=True))
        print(describe_binarization(metadata.get("binarization")))
        print(sparsity_report(mask))
        print(diagonal_finding(mask, metadata))
    else:
        meta = export_from_checkpoint(args.checkpoint, args.config, args.out, args.step, args.sparsity, args.scope)
        step = f"step {meta['step']}" if "step" in meta else "no step recorded (pass --step)"
        print(f"wrote {args.out}: shape {meta['shape']}, sparsity {100 * meta['sparsity']:.2f}%, {step}; "
              f"{describe_binarization(meta.get('binarization'))}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"attention_masks.py: error: {error}")
