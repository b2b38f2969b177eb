"""Tests for attention_masks.py: patterns and their seed-table sparsity, DAM sampling / gradients /
penalty, mask files, the plot script, and (with modeling.py) the mask inside BERT's attention."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_masks as am

ROOT = Path(__file__).resolve().parent.parent
N = 128

# The paper's table (README) sparsity and the exact number of kept entries at n = 128
# (sparsebert_method.md §5): a wrong parameter moves the count, even when the rounding survives.
# BigBird is one seeded draw (pattern_seed 0, torch CPU generator): 884 deterministic + 235 random.
SEED_TABLE = {"strided": ("70.4", 4852), "fixed": ("72.7", 4480), "longformer": ("88.7", 1854),
              "logsparse": ("89.8", 1666), "bigbird": ("93.2", 1119), "star": ("96.1", 634)}
SYMMETRIC = ("dense", "no_diagonal", "strided", "longformer", "logsparse", "star")


def config(**fields) -> am.MaskConfig:
    return am.MaskConfig(**{"attention_mask_type": "dam_s", "mask_seq_length": 16, "num_hidden_layers": 2,
                            "num_attention_heads": 3, **fields})


def dam(mode="dam_s", n=16, layers=2, heads=3, **fields) -> am.DifferentiableMask:
    return am.DifferentiableMask(config(attention_mask_type=mode, mask_seq_length=n, num_hidden_layers=layers,
                                        num_attention_heads=heads, **fields))


# ------------------------------------------------------------------------------ fixed patterns

@pytest.mark.parametrize("name", sorted(SEED_TABLE))
def test_default_patterns_reproduce_seed_table_sparsity(name):
    table, kept = SEED_TABLE[name]
    mask = am.pattern_mask(name, N)
    assert mask.shape == (N, N) and mask.dtype == torch.bool
    assert int(mask.sum()) == kept
    assert f"{100 * am.sparsity(mask):.1f}" == table


def test_dense_and_no_diagonal():
    assert am.sparsity(am.pattern_mask("dense", N)) == 0.0
    no_diag = am.pattern_mask("no_diagonal", N)
    assert not no_diag.diagonal().any() and int(no_diag.sum()) == N * N - N


# Pure-Python predicates (sparse_attention_patterns.md §1.9) at non-default parameters, checked
# entry by entry against the tensor builders.
PREDICATES = {
    "strided": ({"stride": 3}, lambda i, j: abs(i - j) < 3 or (i - j) % 3 == 0),
    "fixed": ({"block": 8, "summary": 2}, lambda i, j: i // 8 == j // 8 or j % 8 >= 6),
    "longformer": ({"window": 5, "global_tokens": [0, 7]}, lambda i, j: abs(i - j) <= 2 or {i, j} & {0, 7}),
    "logsparse": ({}, lambda i, j: abs(i - j) in (0, 1, 2, 4, 8, 16)),
    "star": ({}, lambda i, j: abs(i - j) <= 1 or i == 0 or j == 0),
}


@pytest.mark.parametrize("name", sorted(PREDICATES))
def test_pattern_structure_matches_predicate(name):
    n = 24
    params, keep = PREDICATES[name]
    mask = am.pattern_mask(name, n, **params)
    expected = torch.tensor([[bool(keep(i, j)) for j in range(n)] for i in range(n)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_bidirectional_patterns_are_symmetric(name):
    mask = am.pattern_mask(name, N)
    assert torch.equal(mask, mask.T)


def test_fixed_summary_columns_are_one_sided():
    mask = am.pattern_mask("fixed", N)
    assert mask[0, 7] and not mask[7, 0]  # every query sees summary key 7; 7 sees only its block + summaries


def test_fixed_per_head_summary_groups():
    masks = am.pattern_masks("fixed", 32, 4, block=8, summary=2, num_summary_groups=4)
    assert masks.shape == (4, 32, 32)
    for h in range(4):
        cols = [j for j in range(32) if masks[h, 20, j] and j // 8 != 20 // 8]
        assert cols == [j for j in range(32) if j // 8 != 2 and 6 - 2 * h <= j % 8 < 8 - 2 * h]
    assert len({round(am.sparsity(m), 6) for m in masks}) == 1  # same budget, different positions
    with pytest.raises(ValueError, match="summary"):
        am.pattern_masks("fixed", 32, 4, block=8, summary=3, num_summary_groups=3)


def test_bigbird_structure_seeding_and_per_head():
    a, b = am.pattern_mask("bigbird", N, seed=5), am.pattern_mask("bigbird", N, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, am.pattern_mask("bigbird", N, seed=6))
    base = am.pattern_mask("longformer", N, window=3, global_tokens=[0, 1])
    assert torch.equal(a & base, base)  # window + globals always present
    extra = (a & ~base).sum(dim=1)
    assert int(extra[:2].sum()) == 0 and int(extra.max()) <= 2  # <= num_random keys per non-global row
    heads = am.pattern_masks("bigbird", N, 4, per_head=True, seed=5)
    assert heads.shape == (4, N, N) and torch.equal(heads[0], a)
    assert len({tuple(h.flatten().nonzero().flatten().tolist()) for h in heads}) == 4


def test_bigbird_sparsity_across_seeds():
    values = torch.tensor([am.sparsity(am.pattern_mask("bigbird", N, seed=s)) for s in range(40)])
    assert 0.9300 < values.mean() < 0.9325 and values.std() < 0.001


def test_drop_diagonal_and_short_sequences():
    for name in ("strided", "fixed", "longformer", "logsparse", "star"):
        mask = am.pattern_mask(name, N, drop_diagonal=True)
        assert not mask.diagonal().any()
        full = am.pattern_mask(name, N)
        assert torch.equal(mask | torch.eye(N, dtype=torch.bool), full)
        assert torch.equal(am.pattern_mask(name, 50), full[:50, :50])  # a short mask is the top-left slice


def test_unknown_pattern_and_parameter_errors_name_the_allowed_ones():
    with pytest.raises(ValueError, match="strided.*bigbird"):
        am.pattern_mask("diagonal", N)
    with pytest.raises(ValueError, match="has no parameter.*stride.*allowed: stride, drop_diagonal"):
        am.pattern_mask("strided", N, strides=4)
    with pytest.raises(ValueError, match="odd"):
        am.pattern_mask("longformer", N, window=10)


def test_pattern_parameters_lists_defaults():
    assert am.pattern_parameters("longformer") == {"window": 11, "global_tokens": (0, 64), "drop_diagonal": False}


# ------------------------------------------------------------------------------ measuring

def test_sparsity_report_table():
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    mask[1, 2] = False  # layer 1 head 2 fully dropped
    report = am.sparsity_report(mask)
    lines = report.splitlines()
    assert lines[0].split() == ["layer", "|", "h0", "h1", "h2", "|", "mean"]
    assert lines[2].split() == ["0", "|", "0.0", "0.0", "0.0", "|", "0.0"]
    assert lines[3].split() == ["1", "|", "0.0", "0.0", "100.0", "|", "33.3"]
    assert lines[-1].split() == ["mean", "|", "0.0", "0.0", "50.0", "|", "16.7"]


def test_a_mask_shared_by_every_layer_is_reported_in_one_row():
    mask = torch.ones(6, 3, 4, 4, dtype=torch.bool)
    mask[:, 2] = False  # the same in every layer: head 2 fully dropped
    lines = am.sparsity_report(mask).splitlines()
    assert len(lines) == 3 and lines[2].split() == ["all", "6", "|", "0.0", "0.0", "100.0", "|", "33.3"]


def test_offset_keep_fraction_and_block_layout():
    kept = am.offset_keep_fraction(am.pattern_mask("star", 8))
    # offsets 0, 1 fully kept; offset d >= 2 only via row/column 0: 2 of 2(8 - d) entries
    assert torch.allclose(kept, torch.tensor([1, 1] + [2 / (2 * (8 - d)) for d in range(2, 8)]))
    layout = am.block_layout(am.pattern_mask("fixed", 16, block=4, summary=1), 4)
    assert layout.all()  # summary columns sit in every block
    assert torch.equal(am.block_layout(torch.eye(8, dtype=torch.bool), 4), torch.eye(2, dtype=torch.bool))


# ------------------------------------------------------------------------------ DAM

def test_dam_s_is_symmetric_toeplitz_per_layer_and_head():
    module = dam("dam_s", n=16)
    with torch.no_grad():
        module.mask_logits.normal_()
    for keep in (module(16), module.eval()(16)):
        assert keep.shape == (2, 3, 16, 16)
        i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
        assert torch.equal(keep, keep[:, :, (i - j).abs(), 0])  # M[i, j] = m[|i - j|]
    assert torch.equal(module.binarize(), (module.mask_logits > 0)[:, :, (i - j).abs()])


def test_dam_u_shapes_symmetric_option_and_blocks():
    module = dam("dam_u", n=16)
    assert module.mask_logits.shape == (2, 3, 256)
    sym = dam("dam_u", n=16, dam_symmetric=True)
    assert sym.mask_logits.shape == (2, 3, 16 * 17 // 2)  # upper triangle incl. diagonal, no unused logits
    keep = sym(16)
    assert torch.equal(keep, keep.transpose(-1, -2)) and not torch.equal(keep[0, 0], keep[0, 1])
    blocked = dam("dam_u", n=16, dam_block_size=4)
    assert blocked.mask_logits.shape == (2, 3, 16)
    keep = blocked(16)
    layout = keep[:, :, ::4, ::4]
    assert torch.equal(keep, layout.repeat_interleave(4, -1).repeat_interleave(4, -2))  # one gate per block pair
    blocked_s = dam("dam_s", n=16, dam_block_size=4)
    keep = blocked_s(16)
    assert blocked_s.mask_logits.shape == (2, 3, 4)
    assert torch.equal(keep, keep[:, :, ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2))
    with pytest.raises(ValueError, match="dam_block_size"):
        dam("dam_s", n=16, dam_block_size=5)


def test_share_across_layers_and_init():
    torch.manual_seed(0)
    shared = dam("dam_s", n=128, layers=12, heads=12, dam_share_across_layers=True)
    assert shared.mask_logits.shape == (1, 12, 128)
    assert shared(128).shape == (1, 12, 128, 128)
    std = shared.mask_logits.std().item()
    assert 0.9e-3 < std < 1.1e-3 and abs(shared.mask_logits.mean().item()) < 2e-4


def test_gumbel_sigmoid_hard_samples_have_mean_sigmoid_logit():
    torch.manual_seed(1)
    values = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0])
    for temperature in (1.0, 0.3):
        module = dam("dam_u", n=16, layers=1, heads=len(values), dam_temperature=temperature)
        with torch.no_grad():
            module.mask_logits.copy_(values[None, :, None].expand_as(module.mask_logits))
        draws = 200
        total = sum(module.sample_gates().detach() for _ in range(draws))  # [1, H, 256]
        mean = total.mean(dim=-1)[0] / draws
        p = torch.sigmoid(values)
        count = draws * 256
        # 6 standard deviations of a Binomial(count, p) mean (chance of a false failure < 1e-8)
        assert ((mean - p).abs() <= 6 * (p * (1 - p) / count).sqrt() + 1e-9).all(), (mean, p)
        assert set(total.unique().tolist()) <= set(range(draws + 1))  # every draw was exactly 0 or 1


def test_straight_through_gradient_is_the_soft_sample_gradient():
    module = dam("dam_s", n=8, layers=1, heads=2, dam_temperature=0.7)
    with torch.no_grad():
        module.mask_logits.normal_()
    weights = torch.randn(1, 2, 8, 8)
    state = torch.get_rng_state()
    keep = module(8)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    (keep * weights).sum().backward()
    torch.set_rng_state(state)  # replay the same noise
    u = torch.rand_like(module.mask_logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((module.mask_logits.detach() + u.log() - (-u).log1p()) / 0.7)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    per_gate = torch.zeros(1, 2, 8).index_add_(-1, (i - j).abs().flatten(), weights.flatten(-2))
    expected = per_gate * soft * (1 - soft) / 0.7
    assert torch.allclose(module.mask_logits.grad, expected, rtol=1e-5, atol=1e-7)


def penalty_gradient_and_noise(penalty_gradient: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logit grad of the penalty alone, the hard sample, the expected straight-through pull) of one dam_s forward."""
    module = dam("dam_s", n=8, layers=1, heads=4, dam_lambda=1e-2, dam_penalty_gradient=penalty_gradient,
                 dam_temperature=0.7)
    torch.manual_seed(seed)
    u = torch.rand_like(module.mask_logits).clamp_(1e-6, 1.0 - 1e-6)
    torch.manual_seed(seed)
    module(8)
    module.penalty().backward()
    noisy = module.mask_logits.detach() + u.log() - (-u).log1p()
    soft = torch.sigmoid(noisy / 0.7)
    cells = torch.tensor([8.0] + [2.0 * (8 - d) for d in range(1, 8)])
    return module.mask_logits.grad, (noisy > 0).float(), 1e-2 * cells * soft * (1 - soft) / 0.7


def test_default_penalty_gradient_is_the_released_codes_zero_on_gates_sampled_zero():
    grad, hard, full = penalty_gradient_and_noise("kept_gates")
    assert 0 < hard.sum() < hard.numel()  # both kinds of gate in this sample
    assert (grad[hard == 0] == 0).all()
    assert torch.allclose(grad[hard == 1], full[hard == 1], rtol=1e-5)
    assert dam("dam_s", n=8, layers=1, heads=1).penalty_gradient == "kept_gates"


def test_all_gates_penalty_gradient_pulls_every_gate_down():
    grad, hard, full = penalty_gradient_and_noise("all_gates")
    assert 0 < hard.sum() < hard.numel()
    assert (grad > 0).all() and torch.allclose(grad, full, rtol=1e-5)


def test_penalty_value_does_not_depend_on_its_gradient_estimator():
    values = []
    for estimator in am.PENALTY_GRADIENTS:
        torch.manual_seed(3)
        module = dam("dam_u", n=8, dam_lambda=0.5, dam_penalty_gradient=estimator)
        keep = module(8)
        values.append(module.penalty().item())
        assert values[-1] == 0.5 * keep.sum().item()
    assert values[0] == values[1]
    with pytest.raises(ValueError, match="field 'dam_penalty_gradient' is 'sign'; allowed: kept_gates, all_gates"):
        dam("dam_s", dam_penalty_gradient="sign")


def test_penalty_exact_on_hand_computed_case():
    module = dam("dam_s", n=4, layers=1, heads=1, dam_lambda=0.5).eval()
    with torch.no_grad():
        module.mask_logits.copy_(torch.tensor([[[1.0, -1.0, 2.0, -3.0]]]))
    keep = module(4)
    # offsets 0 and 2 kept: the diagonal (4 cells) and offsets ±2 (2 x 2 cells) -> 8 ones
    assert keep[0, 0].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert module.penalty().item() == 0.5 * 8
    module(3)  # the penalty follows the last forward's (sliced) mask: 3 + 2 ones
    assert module.penalty().item() == 0.5 * 5


def test_penalty_sums_layers_only_when_not_shared():
    for shared, copies in ((True, 1), (False, 4)):
        module = dam("dam_s", n=8, layers=4, heads=2, dam_lambda=1.0, dam_share_across_layers=shared).eval()
        with torch.no_grad():
            module.mask_logits.fill_(1.0)
        module(8)
        assert module.penalty().item() == copies * 2 * 64
    train = dam("dam_u", n=8, dam_lambda=0.25)
    keep = train(8)
    assert train.penalty().item() == 0.25 * keep.sum().item()
    assert am.FixedMask(torch.ones(8, 8), 2, 2, {}).penalty().item() == 0.0


def test_penalty_is_fp32_under_autocast_and_half_logits():
    module = dam("dam_s", n=128, layers=1, heads=12, dam_lambda=1.0).eval()
    with torch.no_grad():
        module.mask_logits.fill_(1.0)
    module.half()  # 196,608 kept entries overflow fp16 (max 65,504)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keep = module(128)
        penalty = module.penalty()
    assert keep.dtype == torch.float32 and penalty.dtype == torch.float32
    assert penalty.item() == 12 * 128 * 128


def test_eval_and_frozen_masks_are_deterministic():
    module = dam("dam_u", n=16)
    with torch.no_grad():
        module.mask_logits.normal_()
    expected = (module.mask_logits > 0)[:, :, module.gate_index].float()
    assert not torch.equal(module(16), module(16))  # training: a fresh sample per forward
    module.eval()
    assert torch.equal(module(16), expected) and torch.equal(module(16), expected)
    assert not module(16).requires_grad
    module.train().freeze()
    assert torch.equal(module(16), expected) and not module.mask_logits.requires_grad


def test_temperature_schedules():
    assert dam(dam_temperature=2.0).temperature_at(0.7) == 2.0
    linear = dam(dam_temperature=1.0, dam_temperature_final=0.2, dam_temperature_schedule="linear")
    assert linear.temperature_at(0.5) == pytest.approx(0.6)
    expo = dam(dam_temperature=1.0, dam_temperature_final=0.01, dam_temperature_schedule="exponential")
    assert expo.temperature_at(0.5) == pytest.approx(0.1) and expo.temperature_at(2.0) == pytest.approx(0.01)
    expo.set_progress(1.0)
    assert expo.temperature == pytest.approx(0.01)
    with pytest.raises(ValueError, match="dam_temperature_schedule"):
        dam(dam_temperature_schedule="cosine")


def test_sequence_length_checks():
    for module in (dam(n=16), am.FixedMask(am.pattern_mask("star", 16), 2, 3, {})):
        assert module(10).shape[-2:] == (10, 10)
        with pytest.raises(ValueError, match="mask_seq_length 16"):
            module(17)


# ------------------------------------------------------------------------------ build from config

def test_build_attention_mask_modes():
    assert am.build_attention_mask(config(attention_mask_type="dense")) is None
    star = am.build_attention_mask(config(attention_mask_type="star", mask_seq_length=N))
    assert isinstance(star, am.FixedMask) and star(N).shape == (1, 1, N, N)
    assert star.state_dict() == {} and list(star.parameters()) == []  # non-persistent buffer
    strided = am.build_attention_mask(config(attention_mask_type="strided", pattern_params={"stride": 8}))
    assert torch.equal(strided(16)[0, 0].bool(), am.pattern_mask("strided", 16, stride=8))
    bigbird = am.build_attention_mask(config(attention_mask_type="bigbird", mask_seq_length=N, pattern_seed=3))
    assert torch.equal(bigbird(N)[0, 0].bool(), am.pattern_mask("bigbird", N, seed=3))
    fixed = am.build_attention_mask(config(attention_mask_type="fixed", pattern_params={"num_summary_groups": 2}))
    assert fixed(16).shape == (1, 3, 16, 16)
    module = am.build_attention_mask(config(dam_share_across_layers=True, dam_lambda=1e-3, dam_block_size=2))
    assert isinstance(module, am.DifferentiableMask) and list(module.state_dict()) == ["mask_logits"]
    assert module.mask_logits.shape == (1, 3, 8) and module.penalty_weight == 1e-3
    with pytest.raises(ValueError, match="field 'attention_mask_type' is 'sparse'; allowed: dense"):
        am.build_attention_mask(config(attention_mask_type="sparse"))
    with pytest.raises(ValueError, match="has no parameter"):
        am.build_attention_mask(config(attention_mask_type="star", pattern_params={"stride": 2}))
    with pytest.raises(ValueError, match="pattern_seed"):
        am.build_attention_mask(config(attention_mask_type="bigbird", pattern_params={"seed": 1}))


@pytest.mark.parametrize("pattern, params, message", [
    ("star", {"drop_diagonal": "false"},
     "field 'pattern_params' entry 'drop_diagonal' (pattern 'star') must be true or false, got the string \"false\""),
    ("strided", {"stride": "4"}, "entry 'stride' (pattern 'strided') must be integer (a whole number), got the string"),
    ("longformer", {"window": 3.5}, "entry 'window' (pattern 'longformer') must be integer"),
    ("bigbird", {"per_head": 1}, "entry 'per_head' (pattern 'bigbird') must be true or false, got 1"),
    ("longformer", {"global_tokens": 5}, "entry 'global_tokens' (pattern 'longformer') must be a list of token positions"),
    ("star", {"global_tokens": [0, "64"]}, "entry 'global_tokens' (pattern 'star') item must be integer"),
    ("star", {"global_tokens": [0, -1]}, "entry 'global_tokens' (pattern 'star') items must be >= 0"),
    ("bigbird", {"num_random": 10**9}, "num_random=1000000000 must be <= the mask length 16"),
])
def test_pattern_params_of_the_wrong_type_or_range_are_refused(pattern, params, message):
    with pytest.raises(ValueError) as error:
        am.build_attention_mask(config(attention_mask_type=pattern, mask_seq_length=16, pattern_params=params))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pattern_params_take_whole_floats_and_a_huge_num_global():
    assert torch.equal(am.pattern_mask("strided", 16, stride=4.0), am.pattern_mask("strided", 16, stride=4))
    assert torch.equal(am.pattern_mask("star", 16, global_tokens=[0.0]), am.pattern_mask("star", 16))
    assert am.pattern_mask("bigbird", 16, num_global=10**12).all()  # every token global, no 10^12 loop


# ------------------------------------------------------------------------------ mask files

def test_mask_file_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    mask = torch.rand(2, 3, 16, 16) > 0.7
    path = tmp_path / "m.safetensors"
    meta = am.save_mask_file(path, mask, {"mode": "dam_s", "lambda": 1e-3, "step": 7})
    loaded, metadata = am.load_mask_file(path)
    assert loaded.dtype == torch.bool and torch.equal(loaded, mask)
    assert metadata == meta == json.loads((tmp_path / "m.json").read_text())
    assert metadata["step"] == 7 and metadata["lambda"] == 1e-3 and metadata["seq_len"] == 16
    assert metadata["sparsity"] == pytest.approx(am.sparsity(mask))
    assert metadata["sparsity_per_head"][1][2] == pytest.approx(am.sparsity(mask[1, 2]))
    assert metadata["sparsity_per_layer"][0] == pytest.approx(am.sparsity(mask[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left


def test_export_binarises_and_file_mode_loads_it_frozen(tmp_path):
    module = dam("dam_s", n=16, dam_share_across_layers=True, dam_lambda=1e-2)
    with torch.no_grad():
        module.mask_logits.normal_()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.sparse_mask = module
    path = tmp_path / "search.safetensors"
    meta = am.export_mask(model, path, step=100)
    assert meta["mode"] == "dam_s" and meta["lambda"] == 1e-2 and meta["step"] == 100
    assert meta["shape"] == [2, 3, 16, 16]
    frozen = am.build_attention_mask(config(attention_mask_type="file", attention_mask_file=str(path)))
    assert isinstance(frozen, am.FixedMask) and list(frozen.parameters()) == []
    assert torch.equal(frozen.train()(16), module.eval()(16).expand(2, 3, 16, 16))
    assert frozen.describe()["source_mode"] == "dam_s"
    expected = r"search.safetensors holds a mask of shape \[2, 3, 16, 16\]; this model needs \[4, 3, 16, 16\]"
    with pytest.raises(ValueError, match=expected):
        am.build_attention_mask(config(attention_mask_type="file", attention_mask_file=str(path), num_hidden_layers=4))
    with pytest.raises(ValueError, match="no attention mask"):
        am.export_mask(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_mask_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors not found"):
        am.load_mask_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        am.save_mask_file(tmp_path / "m.npz", torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        am.save_mask_file(tmp_path / "m.safetensors", torch.ones(1, 1, 2, 2, dtype=torch.bool), {"x": object()})
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        am.load_mask_file(bad)
    from safetensors.torch import save_file
    save_file({"mask": torch.ones(1, 1, 2, 2)}, str(bad))
    with pytest.raises(ValueError, match="bool tensor"):
        am.load_mask_file(bad)
    with pytest.raises(ValueError, match="attention_mask_type 'file' needs 'attention_mask_file'"):
        am.build_attention_mask(config(attention_mask_type="file"))


def test_cli_report_and_plot_script(tmp_path, capsys):
    mask = am.pattern_masks("fixed", 32, 2, block=8, num_summary_groups=2)[None].expand(2, 2, 32, 32)
    path = tmp_path / "fixed.safetensors"
    am.save_mask_file(path, mask, {"mode": "fixed"})
    am.main(["report", str(path)])
    out = capsys.readouterr().out
    shared_row = next(line for line in out.splitlines() if line.startswith("all 2 |"))  # both layers alike
    assert '"mode": "fixed"' in out and shared_row.split()[-1] == f"{100 * am.sparsity(mask):.1f}"
    assert out.rstrip().endswith(am.diagonal_finding(mask, {"mode": "fixed"}))
    am.main(["patterns", "--seq_len", "128"])
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["star"] == "96.13%" and rows["longformer"] == "88.68%" and len(rows) == len(am.PATTERN_NAMES)
    png = tmp_path / "plots" / "fixed.png"
    spec = importlib.util.spec_from_file_location("plot_masks", ROOT / "scripts" / "plot_masks.py")
    plot_masks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_masks)
    plot_masks.main([str(path), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert sorted(p.name for p in png.parent.iterdir()) == ["fixed.png"]  # no temp file left
    with pytest.raises(SystemExit) as exit_info:
        plot_masks.main([str(tmp_path / "nope.safetensors"), "--out", str(png)])
    assert exit_info.value.code == 2 and "nope.safetensors not found" in capsys.readouterr().err


def test_cli_patterns_states_n_and_prints_config_fields_a_config_accepts(capsys):
    am.main(["patterns", "--seq_len", "64"])
    header, *lines = capsys.readouterr().out.splitlines()
    assert "mask_seq_length n = 64" in header
    rows = {line.split()[0]: line for line in lines}
    assert list(rows) == list(am.PATTERN_NAMES)
    assert rows["star"].split()[1] == f"{100 * am.sparsity(am.pattern_mask('star', 64)):.2f}%"
    assert rows["bigbird"].endswith("  pattern_seed 0") and '"seed"' not in rows["bigbird"]
    for name, line in rows.items():  # what it prints, written into a config as it stands, is accepted
        params = json.loads(line.split("pattern_params ")[1].split("  pattern_seed")[0])
        assert params == json.loads(json.dumps(am.pattern_parameters(name)))
        am.MaskConfig(attention_mask_type=name, mask_seq_length=64, pattern_params=params)
    assert json.loads(rows["bigbird"].split("pattern_params ")[1].split("  ")[0]) == {
        "window": 3, "num_global": 2, "num_random": 2, "per_head": False, "drop_diagonal": False}


# ------------------------------------------------------------------------------ inside BERT (modeling.py)

def bert_config(**fields):
    import modeling

    base = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                type_vocab_size=2, mask_seq_length=32)
    base.update(fields)
    return modeling.BertConfig(**base)


def bert(seed=0, **fields):
    import modeling

    torch.manual_seed(seed)
    return modeling.BertModel(bert_config(**fields))


def test_dense_mode_is_the_plain_model(tmp_path):
    import modeling

    torch.manual_seed(0)
    plain = modeling.BertModel(modeling.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   max_position_embeddings=64)).eval()
    dense = bert(attention_mask_type="dense", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).eval()
    assert am.mask_module(dense) is None and dense.mask_parameters() == []
    assert dense.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 40, (3, 20))
    pad = torch.ones(3, 20, dtype=torch.long)
    pad[1, 15:] = 0
    assert torch.equal(dense(ids, attention_mask=pad)[0], plain(ids, attention_mask=pad)[0])
    # an all-keep mask (bias exactly 0) gives the same numbers as no mask at all
    path = tmp_path / "ones.safetensors"
    am.save_mask_file(path, torch.ones(2, 2, 32, 32, dtype=torch.bool), {"mode": "dense"})
    ones = bert(attention_mask_type="file", attention_mask_file=str(path)).eval()
    ones.load_state_dict(dense.state_dict())
    assert torch.allclose(ones(ids, attention_mask=pad)[0], dense(ids, attention_mask=pad)[0], atol=1e-6)


def test_pattern_restricts_what_each_query_sees():
    model = bert(attention_mask_type="star", num_hidden_layers=1).eval()
    ids = torch.randint(1, 40, (1, 32))
    changed = ids.clone()
    changed[0, 20] = 0
    delta = (model(ids)[0] - model(changed)[0]).abs().amax(dim=-1)[0]  # one layer: row i moves iff i sees key 20
    sees = am.pattern_mask("star", 32)[:, 20]
    assert (delta[sees] > 1e-4).all() and (delta[~sees] < 1e-6).all()


def test_gradient_reaches_logits_through_attention_scores():
    torch.manual_seed(0)
    model = bert(attention_mask_type="dam_s", dam_lambda=0.0, dam_temperature=0.8).double().train()
    mask = model.sparse_mask
    with torch.no_grad():
        mask.mask_logits.normal_()
    ids = torch.randint(0, 40, (2, 32))
    weights = torch.randn(2, 32, 32, dtype=torch.float64)
    captured = {}

    def capture(module, args, out):
        out.retain_grad()
        captured["keep"] = out

    hooks = [mask.register_forward_pre_hook(lambda mod, args: captured.update(rng=torch.get_rng_state())),
             mask.register_forward_hook(capture)]
    (model(ids)[0] * weights).sum().backward()
    for hook in hooks:
        hook.remove()
    grad = mask.mask_logits.grad
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.3  # penalty is 0: all from the scores
    # autograd check of the straight-through chain: dL/da = sum over each gate's cells of dL/dM * dsoft/da
    torch.set_rng_state(captured["rng"])
    u = torch.rand_like(mask.mask_logits.float()).clamp(1e-6, 1 - 1e-6)  # sampling runs in fp32
    soft = torch.sigmoid((mask.mask_logits.detach().float() + u.log() - (-u).log1p()) / 0.8).double()
    index = mask.gate_index.flatten()
    per_gate = torch.zeros_like(soft).index_add_(-1, index, captured["keep"].grad.double().flatten(-2))
    assert torch.allclose(grad, per_gate * soft * (1 - soft) / 0.8, rtol=1e-4, atol=1e-8)
    # finite differences of the loss in the (continuous) mask values, through the -10000 bias
    keep = captured["keep"].detach().double().clone().requires_grad_(True)
    hook = mask.register_forward_hook(lambda mod, args, out: keep)

    def loss() -> torch.Tensor:
        return (model(ids)[0] * weights).sum()

    loss().backward()
    eps = 1e-8
    kept, dropped = keep.detach().nonzero()[:4].tolist(), (keep.detach() == 0).nonzero()[:1].tolist()
    assert all(abs(keep.grad[tuple(cell)].item()) > 1e-2 for cell in kept)
    with torch.no_grad():
        for cell in kept + dropped:  # a dropped key's exp(-10000) weight passes (exactly) no gradient
            keep[tuple(cell)] += eps
            up = loss()
            keep[tuple(cell)] -= 2 * eps
            down = loss()
            keep[tuple(cell)] += eps
            numeric = (up - down) / (2 * eps)
            assert numeric.item() == pytest.approx(keep.grad[tuple(cell)].item(), rel=1e-5, abs=1e-6)
    hook.remove()
    assert keep.grad.abs().sum() > 0


def test_fully_masked_row_gives_finite_output(tmp_path):
    mask = am.pattern_masks("star", 32).expand(2, 2, 32, 32).clone()
    mask[:, :, 5] = False  # query 5 may attend to nothing, in every layer and head
    path = tmp_path / "holes.safetensors"
    am.save_mask_file(path, mask, {"mode": "test"})
    model = bert(attention_mask_type="file", attention_mask_file=str(path), num_hidden_layers=2).train()
    ids = torch.randint(0, 40, (2, 32))
    pad = torch.ones(2, 32, dtype=torch.long)
    pad[0, 24:] = 0
    sequence, pooled = model(ids, attention_mask=pad)
    assert torch.isfinite(sequence).all() and torch.isfinite(pooled).all()
    sequence.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the documented rule: every score of that row moves by -10000, so one layer attends as if unmasked
    am.save_mask_file(path, mask[:1], {"mode": "test"})
    one_layer = bert(seed=1, attention_mask_type="file", attention_mask_file=str(path), num_hidden_layers=1).eval()
    dense = bert(seed=1, num_hidden_layers=1).eval()
    dense.load_state_dict(one_layer.state_dict())
    out_masked, out_dense = one_layer(ids, attention_mask=pad)[0], dense(ids, attention_mask=pad)[0]
    assert torch.allclose(out_masked[:, 5], out_dense[:, 5], atol=1e-5)
    assert not torch.allclose(out_masked[:, 10], out_dense[:, 10], atol=1e-3)


def test_search_export_and_reload_give_the_same_model(tmp_path):
    model = bert(attention_mask_type="dam_u", dam_symmetric=True, dam_lambda=1e-3)
    with torch.no_grad():
        model.sparse_mask.mask_logits.normal_()
    ids = torch.randint(0, 40, (2, 32))
    model.train()(ids)
    assert model.sparse_mask.penalty().dtype == torch.float32 and model.sparse_mask.penalty().item() > 0
    assert model.mask_parameters() == [model.sparse_mask.mask_logits]
    assert "sparse_mask.mask_logits" in model.state_dict()
    path = tmp_path / "dam_u.safetensors"
    meta = am.export_mask(model, path, step=3)
    assert meta["shape"] == [2, 2, 32, 32] and meta["symmetric"] is True
    reloaded = bert(attention_mask_type="file", attention_mask_file=str(path))
    reloaded.load_state_dict(am.without_mask_state(model.state_dict()))
    model.eval()
    assert torch.equal(reloaded.train()(ids)[0], model(ids)[0])  # the frozen mask ignores train mode
    model.sparse_mask.freeze()
    assert model.mask_parameters() == []
    assert torch.equal(model.train()(ids)[0], reloaded(ids)[0])


def test_dam_s_learns_the_one_offset_a_copy_task_needs():
    """Target at position i is the token at i - 3. With lambda = 1e-3 (the paper's grid), DAM_s keeps
    offset 3 and drops every other offset, the main diagonal included (the residual stream already
    carries token i). Recorded on CPU, seeds 0-3, 200 steps: every head keeps exactly {3}."""
    model = bert(vocab_size=16, num_hidden_layers=1, max_position_embeddings=16, type_vocab_size=1,
                 mask_seq_length=16, attention_mask_type="dam_s", dam_lambda=1e-3, dam_share_across_layers=True)
    head = torch.nn.Linear(32, 16)
    weights = [p for n, p in model.named_parameters() if "mask_logits" not in n] + list(head.parameters())
    optimizer = torch.optim.Adam([{"params": weights, "lr": 3e-3},
                                  {"params": model.mask_parameters(), "lr": 5e-2}])
    for _ in range(200):
        ids = torch.randint(0, 16, (64, 16))
        logits = head(model(ids)[0][:, 3:])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, :-3].reshape(-1))
        optimizer.zero_grad()
        (loss + model.sparse_mask.penalty()).backward()
        optimizer.step()
    kept = [torch.nonzero(gates).flatten().tolist() for gates in model.sparse_mask.mask_logits[0] > 0]
    assert kept == [[3], [3]], kept  # learned pattern: per head, the kept |i - j| offsets
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, 16, (256, 16))
        accuracy = (head(model(ids)[0][:, 3:]).argmax(-1) == ids[:, :-3]).float().mean().item()
    assert accuracy > 0.95
    profile = am.offset_keep_fraction(model.sparse_mask.binarize())[0]
    assert profile[:, 0].eq(0).all() and profile[:, 3].eq(1).all() and profile.sum() == 2


def test_cli_exports_a_checkpoints_logits(tmp_path, capsys):
    import modeling

    cfg = bert_config(attention_mask_type="dam_s", dam_lambda=1e-2)
    torch.manual_seed(0)
    model = modeling.BertForPreTraining(cfg)
    with torch.no_grad():
        model.bert.sparse_mask.mask_logits.normal_()
    cfg.to_json_file(tmp_path / "bert_config.json")
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt_5.pt")
    out = tmp_path / "mask.safetensors"
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--config", str(tmp_path / "bert_config.json"),
             "--out", str(out), "--step", "5"])
    assert "wrote" in capsys.readouterr().out
    mask, meta = am.load_mask_file(out)
    assert torch.equal(mask, model.bert.sparse_mask.full_mask()) and meta["step"] == 5 and meta["lambda"] == 1e-2
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no '\\*sparse_mask.mask_logits'"):
        am.main(["export", "--checkpoint", str(tmp_path / "plain.pt"), "--config", str(tmp_path / "bert_config.json"),
                 "--out", str(out)])


def test_cli_export_of_a_missing_checkpoint_says_not_found(tmp_path):
    cfg_path = tmp_path / "bert_config.json"
    cfg_path.write_text(json.dumps({"attention_mask_type": "dam_s"}))
    with pytest.raises(FileNotFoundError, match=r"ckpt_9\.pt not found: pass --checkpoint"):
        am.main(["export", "--checkpoint", str(tmp_path / "ckpt_9.pt"), "--config", str(cfg_path),
                 "--out", str(tmp_path / "mask.safetensors")])


def test_cli_export_reads_the_search_config_recorded_in_the_checkpoint(tmp_path):
    """The README's search passes the mask type and λ on the command line over a dense
    bert_config.json; exporting its checkpoint with that same file must give the run's mask and λ."""
    import modeling

    searched = bert_config(attention_mask_type="dam_s", dam_lambda=1e-3)  # what run_pretraining trained
    torch.manual_seed(0)
    model = modeling.BertForPreTraining(searched)
    with torch.no_grad():
        model.bert.sparse_mask.mask_logits.normal_()
    bert_config().to_json_file(tmp_path / "bert_config.json")  # attention_mask_type dense, as shipped
    torch.save({"model": model.state_dict(), "config": searched.to_json_string()}, tmp_path / "ckpt_5.pt")
    out = tmp_path / "mask.safetensors"
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--config", str(tmp_path / "bert_config.json"),
             "--out", str(out)])
    mask, meta = am.load_mask_file(out)
    assert torch.equal(mask, model.bert.sparse_mask.full_mask())
    assert meta["mode"] == "dam_s" and meta["lambda"] == 1e-3
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--out", str(out)])  # --config not needed
    assert torch.equal(am.load_mask_file(out)[0], mask)


def test_finding_counts_heads_once_for_a_shared_mask_and_averages_offsets():
    n = 10
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    no_diag, band = (d >= 1) & (d <= 2), d <= 1  # head 0 drops the diagonal, head 1 keeps it
    heads = torch.stack([no_diag, band])
    finding = am.mask_finding(heads[None].expand(3, 2, n, n))
    lines = am.finding_text(finding, offsets_shown=3).splitlines()
    assert lines[0] == ("Main diagonal dropped in 1 of 2 heads; offset 1 kept in 2 of 2 "
                        "(one mask shared by all 3 layers).")
    assert lines[1] == "Kept fraction per offset |i - j|: 0: 0.50 1: 1.00 2: 0.50; 3..9: 0.00"
    assert lines[2] == f"Sparsity of the binarised mask: {100 * am.sparsity(heads):.1f} %" and len(lines) == 3
    assert finding["diagonal_kept_per_unit"] == [0.0, 1.0] and finding["offset1_kept_per_unit"] == [1.0, 1.0]
    per_layer = am.mask_finding(torch.stack([heads, heads.flip(0)]))  # the layers differ: layer-heads
    assert (per_layer["units"], per_layer["count"], per_layer["diagonal_dropped"]) == ("layer-heads", 4, 2)


@pytest.mark.parametrize("decided, caveat", [(0.2, True), (0.7, False)])
def test_finding_states_what_the_logits_say_and_warns_when_most_gates_are_undecided(decided, caveat):
    metadata = {"mode": "dam_s", "step": 60, "lambda": 1e-5, "expected_sparsity": 0.48,
                "deterministic_sparsity": 0.5, "decided_gates": decided}
    text = am.diagonal_finding(torch.ones(1, 2, 4, 4, dtype=torch.bool), metadata)
    assert text.startswith("Finding of the dam_s mask (step 60, λ = 1e-05):\n")
    assert "Sparsity of the binarised mask: 0.0 % (expected under sampling 48.0 %, of 1[a > 0] 50.0 %)" in text
    assert f"Decided gates (sigma(a) < 0.1 or > 0.9): {100 * decided:.1f} %" in text
    assert ("Caveat: most gates are undecided; the mask is close to a coin flip" in text) == caveat


def test_an_undecided_target_search_is_told_to_search_longer_not_to_use_a_target():
    metadata = {"mode": "dam_s", "step": 250, "target_sparsity": 0.8, "decided_gates": 0.24}
    text = am.diagonal_finding(torch.ones(1, 2, 4, 4, dtype=torch.bool), metadata)
    assert text.startswith("Finding of the dam_s mask (step 250, target sparsity 0.8):\n")
    assert "the budget's cut runs through near-coin-flip gates: search longer" in text
    assert "--target_sparsity" not in text


def test_mask_export_never_replaces_an_unrelated_file_with_its_sidecar(tmp_path):
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    (tmp_path / "config.json").write_text('{"hidden_size": 768}')
    with pytest.raises(ValueError, match="config.json, which is not a mask sidecar"):
        am.save_mask_file(tmp_path / "config.safetensors", mask)
    assert (tmp_path / "config.json").read_text() == '{"hidden_size": 768}'
    assert not (tmp_path / "config.safetensors").exists()
    am.save_mask_file(tmp_path / "m.safetensors", mask)
    am.save_mask_file(tmp_path / "m.safetensors", mask, {"step": 2})  # its own sidecar is replaced
    assert json.loads((tmp_path / "m.json").read_text())["step"] == 2


def test_mask_export_cli_refuses_out_equal_to_its_inputs(tmp_path):
    checkpoint = tmp_path / "ckpt.safetensors"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(ValueError, match="--out .* is the same file as --checkpoint"):
        am.main(["export", "--checkpoint", str(checkpoint), "--out", str(checkpoint)])
    config = tmp_path / "search.json"
    config.write_text("{}")
    with pytest.raises(ValueError, match="sidecar of --out .* is the same file as --config"):
        am.main(["export", "--checkpoint", str(checkpoint), "--config", str(config),
                 "--out", str(tmp_path / "search.safetensors")])
    assert checkpoint.read_bytes() == b"not read" and config.read_text() == "{}"


# ------------------------------------------------------------------------------ export provenance, module layering

def search_checkpoint(path: Path, **recorded) -> "torch.nn.Module":
    """A DAM search checkpoint as run_pretraining.py writes one: weights, its config, ``recorded`` keys."""
    import modeling

    searched = bert_config(attention_mask_type="dam_u", dam_lambda=1e-3)
    torch.manual_seed(0)
    model = modeling.BertForPreTraining(searched)
    with torch.no_grad():
        model.bert.sparse_mask.mask_logits.normal_()
    torch.save({"model": model.state_dict(), "config": searched.to_json_string(), **recorded}, path)
    return model


@pytest.mark.parametrize("name, recorded, step", [
    ("ckpt_5.pt", {"global_step": 5, "phase2": False}, 5),
    ("search.pt", {"global_step": 5, "phase2": False}, 5),  # renamed: the recorded step still holds
    ("ckpt_13.pt", {"global_step": 3, "phase2": True, "args": json.dumps({"phase1_end_step": 10})}, 13),
    ("search.pt", {"global_step": 3, "phase2": True, "args": json.dumps({"phase1_end_step": 10})}, 13),
    ("ckpt_13.pt", {"global_step": 3, "phase2": True}, 13),  # phase 2 without its offset: the name's N
    ("ckpt_42.pt", {}, 42),  # a foreign checkpoint: the name's N
    ("search.pt", {}, None),
])
def test_export_records_the_checkpoints_number_as_its_step(tmp_path, capsys, name, recorded, step):
    search_checkpoint(tmp_path / name, **recorded)
    out = tmp_path / "mask.safetensors"
    am.main(["export", "--checkpoint", str(tmp_path / name), "--out", str(out)])
    meta = am.load_mask_file(out)[1]
    assert meta.get("step") == step and json.loads((tmp_path / "mask.json").read_text()).get("step") == step
    printed = capsys.readouterr().out
    assert (f"step {step}" if step is not None else "no step recorded (pass --step)") in printed
    am.main(["export", "--checkpoint", str(tmp_path / name), "--out", str(out), "--step", "7"])  # the flag wins
    assert am.load_mask_file(out)[1]["step"] == 7


def project_imports(path: Path) -> set[str]:
    """The modules of this repository that ``path`` imports, anywhere in it (functions included)."""
    project = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & project


def test_attention_masks_imports_only_atomic_io_checkpoints_and_utils_of_the_project():
    assert project_imports(ROOT / "attention_masks.py") == {"atomic_io", "checkpoints", "utils"}
    reached, todo = set(), ["attention_masks"]
    while todo:  # and so, through them, never modeling
        for module in project_imports(ROOT / f"{todo.pop()}.py") - reached:
            reached.add(module)
            todo.append(module)
    assert reached <= {"atomic_io", "checkpoints", "utils"}, reached
    assert "attention_masks" in project_imports(ROOT / "modeling.py")  # the one direction


def test_export_command_runs_without_importing_modeling(tmp_path):
    model = search_checkpoint(tmp_path / "ckpt_12.pt", global_step=2, phase2=True,
                              args=json.dumps({"phase1_end_step": 10}))
    out = tmp_path / "mask.safetensors"
    argv = ["attention_masks.py", "export", "--checkpoint", str(tmp_path / "ckpt_12.pt"), "--out", str(out)]
    script = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path('attention_masks.py', run_name='__main__'); "
              f"print(sorted(m for m in sys.modules if m in ('modeling', 'sparse_attention', 'training')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    wrote, imported = result.stdout.strip().splitlines()
    assert wrote.startswith(f"wrote {out}") and imported == "[]"
    mask, meta = am.load_mask_file(out)
    assert torch.equal(mask, model.bert.sparse_mask.full_mask()) and meta["step"] == 12 and meta["mode"] == "dam_u"


def test_bert_config_inherits_the_mask_fields_with_their_defaults_and_checks():
    import modeling

    mask_fields = {f.name: f for f in dataclasses.fields(am.MaskConfig)}
    bert_fields = {f.name: f for f in dataclasses.fields(modeling.BertConfig)}
    assert all(bert_fields[name] is f for name, f in mask_fields.items())  # inherited, not declared again
    assert {name: getattr(modeling.BertConfig(), name) for name in mask_fields} == dataclasses.asdict(am.MaskConfig())
    data = modeling.BertConfig(attention_mask_type="dam_s", dam_lambda=1e-3, num_hidden_layers=3).to_dict()
    assert dataclasses.asdict(am.MaskConfig.from_dict(data)) == {name: data[name] for name in mask_fields}
    for bad, message in [({"dam_init_std": -1.0}, "field 'dam_init_std' must be >= 0"),
                         ({"dam_symmetric": "no"}, "field 'dam_symmetric' must be true or false"),
                         ({"dam_temperature_final": None, "attention_mask_file": 3}, "'attention_mask_file' must be str"),
                         ({"dam_lamda": 1.0}, "unknown attention-mask field 'dam_lamda'")]:
        for config_class in (am.MaskConfig, modeling.BertConfig):  # one check, one message, for both
            with pytest.raises(ValueError, match=message):
                config_class.from_dict({**data, **bad})


# ------------------------------------------------------------------------------ budgeted binarisation

def groups_of(mask_or_scores: torch.Tensor, scope: str) -> torch.Tensor:
    """[groups, entries]: the entries each scope counts its budget over."""
    layers, heads = mask_or_scores.shape[:2]
    return mask_or_scores.reshape({"global": 1, "layer": layers, "head": layers * heads}[scope], -1)


def reference_keep_highest(scores: torch.Tensor, sparsity_target: float, scope: str) -> torch.Tensor:
    """keep_highest written out by hand: per group, sort (score high first, then index low first)."""
    groups = groups_of(scores, scope)
    kept = round((1 - sparsity_target) * groups.shape[1])
    mask = torch.zeros_like(groups, dtype=torch.bool)
    for g, row in enumerate(groups.tolist()):
        for i in sorted(range(len(row)), key=lambda i: (-row[i], i))[:kept]:
            mask[g, i] = True
    return mask.reshape(scores.shape)


@pytest.mark.parametrize("scope", am.BUDGET_SCOPES)
@pytest.mark.parametrize("sparsity_target", [0.1, 0.7, 0.93])
def test_keep_highest_keeps_exactly_the_budget_in_each_scope_on_random_scores(scope, sparsity_target):
    scores = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    mask = am.keep_highest(scores, sparsity_target, scope)
    kept, values = groups_of(mask, scope), groups_of(scores, scope)
    expected = round((1 - sparsity_target) * kept.shape[1])
    assert kept.sum(dim=1).tolist() == [expected] * kept.shape[0]
    for row_kept, row_values in zip(kept, values):  # every kept score beats every dropped one in its group
        assert row_values[row_kept].min() > row_values[~row_kept].max()
    assert torch.equal(mask, reference_keep_highest(scores, sparsity_target, scope))


@pytest.mark.parametrize("scope", am.BUDGET_SCOPES)
def test_keep_highest_on_tied_scores_is_exact_deterministic_and_prefers_the_lower_flat_index(scope):
    # Three score levels over 600 entries: every cut falls inside a tie.
    scores = torch.randint(0, 3, (2, 3, 10, 10), generator=torch.Generator().manual_seed(1)).float()
    mask = am.keep_highest(scores, 0.6, scope)
    assert torch.equal(mask, reference_keep_highest(scores, 0.6, scope))
    assert torch.equal(mask, am.keep_highest(scores.clone(), 0.6, scope))  # same input, same mask
    groups = groups_of(mask, scope)
    assert groups.sum(dim=1).tolist() == [round(0.4 * groups.shape[1])] * groups.shape[0]
    # All equal: each group keeps its first 40 % of entries in row-major (layer, head, query, key) order.
    flat = groups_of(am.keep_highest(torch.zeros(2, 3, 10, 10), 0.6, scope), scope)
    size = flat.shape[1]
    assert all(row.tolist() == [True] * round(0.4 * size) + [False] * (size - round(0.4 * size)) for row in flat)


def test_dam_s_budget_cuts_a_tied_offset_at_its_first_rows_and_is_the_eval_mask():
    """A DAM_s gate covers every entry of its offset, so the budget cuts inside ties."""
    module = dam("dam_s", n=16, layers=2, heads=3, dam_binarize_sparsity=0.75, dam_binarize_scope="head")
    with torch.no_grad():
        module.mask_logits.copy_(torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2)))
    mask = module.binarize()
    assert sparsity_per_head_counts(mask) == [[64] * 3] * 2  # round(0.25 * 256) kept in each head
    assert torch.equal(mask, reference_keep_highest(module.mask_logits[:, :, module.gate_index], 0.75, "head"))
    assert module.binarization() == {"rule": "budget", "scope": "head", "sparsity": 0.75}
    assert torch.equal(module.eval()(16), mask.float()) and torch.equal(module.eval()(8), mask[..., :8, :8].float())
    assert not torch.equal(mask, (module.mask_logits > 0)[:, :, module.gate_index])  # not the threshold's mask
    assert dam("dam_s").binarization() == {"rule": "threshold", "threshold": "sigma(a) > 0.5"}


def sparsity_per_head_counts(mask: torch.Tensor) -> list[list[int]]:
    return mask.sum(dim=(-1, -2)).tolist()


def test_frozen_mask_config_adopts_the_searchs_rule_unless_the_config_sets_its_own():
    searched = config(dam_target_sparsity=0.7, dam_binarize_scope="layer")
    frozen = am.frozen_mask_config(config(), searched)
    assert (frozen.dam_target_sparsity, frozen.dam_binarize_sparsity, frozen.dam_binarize_scope) == (None, 0.7, "layer")
    own = am.frozen_mask_config(config(dam_binarize_sparsity=0.9), searched)  # the user's own budget wins
    assert (own.dam_binarize_sparsity, own.dam_binarize_scope) == (0.9, "global")
    # A lambda search wrote 1[a > 0]: a target in the fine-tuning config does not change that mask.
    threshold = am.frozen_mask_config(config(dam_target_sparsity=0.8), config())
    assert threshold.dam_binarize_sparsity is None and threshold.dam_target_sparsity is None
    assert am.frozen_mask_config(config(dam_target_sparsity=0.8), None).dam_binarize_sparsity == 0.8  # none recorded
    star = config(attention_mask_type="star")
    assert am.frozen_mask_config(star, searched) is star


def test_search_state_is_named_in_one_place():
    module = dam("dam_u", dam_target_sparsity=0.5)
    assert {name for name, _ in module.named_buffers() if name in module.state_dict()} == set(am.SEARCH_STATE_NAMES)
    keys = ["bert.sparse_mask.mask_logits", "bert.sparse_mask.lagrange_multipliers", "module.sparse_mask.target_start",
            "target_start", "bert.encoder.target_start", "bert.sparse_mask.gate_index"]
    assert [key for key in keys if am.is_search_state(key)] == keys[1:4]


def test_the_mask_state_is_reached_through_its_accessors():
    import modeling

    model = modeling.BertForPreTraining(bert_config(attention_mask_type="dam_u", dam_target_sparsity=0.5))
    module, state = model.bert.sparse_mask, model.state_dict()
    assert am.mask_module(model) is module and am.mask_module(module) is module
    assert am.mask_module(modeling.BertForPreTraining(bert_config())) is None
    assert am.mask_state(state).keys() == module.state_dict().keys() == {"mask_logits", *am.SEARCH_STATE_NAMES}
    assert am.without_mask_state(state).keys() == state.keys() - {f"bert.sparse_mask.{k}" for k in module.state_dict()}
    assert am.mask_logits_key(state) == "bert.sparse_mask.mask_logits"
    assert am.mask_logits_key(model.bert.state_dict()) == "sparse_mask.mask_logits"  # a headless model's
    assert am.mask_logits_key(am.without_mask_state(state)) is None


def target_search_checkpoint(path: Path, mode: str = "dam_u", **fields) -> "torch.nn.Module":
    """A target search's checkpoint as run_pretraining.py writes one (multipliers set, target 0.7)."""
    import modeling

    searched = bert_config(attention_mask_type=mode, dam_target_sparsity=0.7, **fields)
    torch.manual_seed(0)
    model = modeling.BertForPreTraining(searched)
    with torch.no_grad():
        model.bert.sparse_mask.mask_logits.normal_()
        model.bert.sparse_mask.lagrange_multipliers.copy_(torch.tensor([0.25, 0.125]))
    torch.save({"model": model.state_dict(), "config": searched.to_json_string(), "global_step": 9,
                "phase2": False}, path)
    return model


@pytest.mark.parametrize("flags, sparsity_target, scope", [
    ([], 0.7, "global"),  # the search's own rule: its target
    (["--sparsity", "0.9"], 0.9, "global"),
    (["--sparsity", "0.85", "--scope", "layer"], 0.85, "layer"),
    (["--sparsity", "0.6", "--scope", "head"], 0.6, "head"),
    (["--scope", "head"], 0.7, "head"),  # the target, counted per head
])
def test_cli_export_binarises_at_the_budget_and_records_the_rule(tmp_path, capsys, flags, sparsity_target, scope):
    model = target_search_checkpoint(tmp_path / "ckpt_9.pt")
    out = tmp_path / "mask.safetensors"
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_9.pt"), "--out", str(out), *flags])
    mask, meta = am.load_mask_file(out)
    per_group = groups_of(mask, scope)
    assert per_group.sum(dim=1).tolist() == [round((1 - sparsity_target) * per_group.shape[1])] * per_group.shape[0]
    logits = model.bert.sparse_mask.mask_logits.detach()[:, :, model.bert.sparse_mask.gate_index]
    assert torch.equal(mask, am.keep_highest(logits, sparsity_target, scope))
    rule = {"rule": "budget", "scope": scope, "sparsity": sparsity_target}
    assert meta["binarization"] == rule and json.loads((tmp_path / "mask.json").read_text())["binarization"] == rule
    assert meta["lagrange_multipliers"] == [0.25, 0.125] and meta["target_sparsity"] == 0.7  # the search's own
    assert f"sparsity {sparsity_target}" in capsys.readouterr().out
    am.main(["report", str(out)])
    assert f"binarisation: budget, sparsity {sparsity_target} {am.SCOPE_WORDS[scope]}" in capsys.readouterr().out


def test_cli_export_of_a_lambda_search_keeps_the_threshold_unless_given_a_budget(tmp_path, capsys):
    model = search_checkpoint(tmp_path / "ckpt_5.pt")
    out = tmp_path / "mask.safetensors"
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--out", str(out)])
    mask, meta = am.load_mask_file(out)
    assert torch.equal(mask, model.bert.sparse_mask.full_mask()) and meta["binarization"]["rule"] == "threshold"
    am.main(["report", str(out)])
    assert "binarisation: threshold, sigma(a) > 0.5" in capsys.readouterr().out
    am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--out", str(out), "--sparsity", "0.8"])
    assert am.load_mask_file(out)[0].sum().item() == round(0.2 * 2 * 2 * 32 * 32)
    with pytest.raises(ValueError, match=r"--scope head needs --sparsity: .* pass --sparsity S"):
        am.main(["export", "--checkpoint", str(tmp_path / "ckpt_5.pt"), "--out", str(tmp_path / "x.safetensors"),
                 "--scope", "head"])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("flags, named", [
    (["--sparsity", "1.2"], "argument --sparsity: '1.2' is not a sparsity"),
    (["--sparsity", "0"], "argument --sparsity: '0' is not a sparsity"),
    (["--sparsity", "nan"], "argument --sparsity: 'nan' is not a sparsity"),
    (["--sparsity", "90%"], "argument --sparsity: '90%' is not a sparsity"),
    (["--sparsity", "0.9", "--scope", "row"], "argument --scope: invalid choice: 'row' (choose from 'global', "),
])
def test_cli_export_refuses_a_bad_budget_in_one_line_before_writing(tmp_path, capsys, flags, named):
    target_search_checkpoint(tmp_path / "ckpt_9.pt")
    out = tmp_path / "mask.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        am.main(["export", "--checkpoint", str(tmp_path / "ckpt_9.pt"), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and named in err[0], err
    assert err[0].startswith("attention_masks.py export: error:")
    assert "strictly between 0 and 1" in err[0] or "'head'" in err[0]  # the fix, not just the fault
    assert not out.exists() and not out.with_suffix(".json").exists()
