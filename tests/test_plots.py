"""scripts/plot_masks.py and scripts/plot_training.py: what they draw, and their one-line errors."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attention_masks as am
from utils import MetricLogger

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_masks = load_script("plot_masks")
plot_training = load_script("plot_training")


def kept_colour_pixels(png: Path) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(plot_masks.KEPT_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=-1) <= 6).sum())


def banded(num_layers: int, num_heads: int, n: int, width: int) -> torch.Tensor:
    offsets = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    return (offsets <= width).expand(num_layers, num_heads, n, n).clone()


def test_shared_mask_draws_each_head_large_and_dark_means_kept(tmp_path):
    paths = {}
    for width in (3, 12):  # four times the kept pairs, about four times the dark pixels
        mask_file = tmp_path / f"band{width}.safetensors"
        am.save_mask_file(mask_file, banded(3, 4, 64, width), {"mode": "dam_s", "lambda": 1e-4, "step": 80})
        paths[width] = plot_masks.plot_mask_file(str(mask_file), str(tmp_path / f"band{width}.png"))
    assert [p.name for p in paths[3]] == ["band3.png"]  # no pages unless asked
    kept = {w: int(banded(1, 1, 64, w).sum()) for w in paths}
    ratio = kept_colour_pixels(paths[12][0]) / kept_colour_pixels(paths[3][0])
    assert ratio == pytest.approx(kept[12] / kept[3], rel=0.15)
    # 4 heads in a 2 x 2 grid: each 64 x 64 map gets a few hundred pixels a side.
    width_px, height_px = Image.open(paths[3][0]).size
    assert width_px >= 2 * 2 * 64 * 2 and height_px >= 2 * 64 * 2


def test_per_layer_masks_get_layer_means_and_pages(tmp_path):
    mask = banded(3, 2, 32, 2)
    mask[1, 0] = True  # layer 1 differs: the overview shows layer means, a page per layer holds every head
    mask_file = tmp_path / "m.safetensors"
    am.save_mask_file(mask_file, mask, {"mode": "dam_u"})
    out = tmp_path / "pics" / "m.png"
    plot_masks.main([str(mask_file), "--out", str(out), "--pages"])
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["m.png", "m_layer0.png", "m_layer1.png", "m_layer2.png"]
    assert all(Image.open(out.parent / name).size[0] >= 600 for name in names)


def test_plot_masks_names_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_masks.main([str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "nope.safetensors not found" in capsys.readouterr().err


def write_log(path: Path, lines: list[tuple[object, dict]]) -> None:
    logger = MetricLogger(path, verbose=False)
    for step, data in lines:
        logger.log(step, data)
    logger.close()


def step_line(step: int, loss: float, **extra) -> tuple[tuple[int, int], dict]:
    return (0, step), {"average_loss": loss, "step_loss": loss + 0.1, "learning_rate": 1e-3 * step,
                       "mask_learning_rate": 5e-2 * step, **extra}


def test_training_series_reads_the_logger_and_a_resume_replaces_redone_steps(tmp_path):
    log = tmp_path / "run" / "dllogger.json"
    write_log(log, [("PARAMETER", {"Config": json.dumps({"lamb": 1e-3})}),
                    step_line(1, 9.0, mask_penalty=2.0, mask_sparsity=0.5),
                    step_line(2, 8.0, mask_penalty=1.9, mask_sparsity=0.55),
                    step_line(3, 7.5, mask_penalty=1.8, mask_sparsity=0.6),  # interrupted after this line
                    ((0, 3), {"final_loss": 7.5}), ((), {"e2e_train_time": 1.0}),
                    ("PARAMETER", {"Config": json.dumps({"lamb": 1e-3})}),
                    step_line(3, 7.0, mask_penalty=1.7, mask_sparsity=0.65),  # resumed from step 2
                    step_line(4, 6.5, mask_penalty=1.6, mask_sparsity=0.7)])
    records = plot_training.read_log(log)
    series = plot_training.training_series(records)
    assert series["average_loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.5)]
    assert series["mask_sparsity"][-1] == (4, 0.7) and series["mask_learning_rate"][0] == (1, 0.05)
    assert plot_training.search_lambda(records) == 1e-3
    png = plot_training.plot_training_log(log)
    assert png == log.with_name("training_curves.png") and Image.open(png).size == (1100, 1000)


def lambda_search_series(steps: int = 100) -> dict:
    """A λ search's curves as the issue saw them: penalty 9.84 -> 9.81, sparsity 49.8 -> 50.7 %."""
    return {"average_loss": [(s, 3.0 - 0.001 * s) for s in range(1, steps + 1)],
            "mask_penalty": [(s, 9.84 - 0.0003 * s) for s in range(1, steps + 1)],
            "mask_sparsity": [(s, 0.498 + 0.00009 * s) for s in range(1, steps + 1)],
            "deterministic_sparsity": [(s, 0.498 + 0.00009 * s) for s in range(1, steps + 1)],
            "expected_sparsity": [(s, 0.5) for s in range(1, steps + 1)],
            "decided_gates": [(s, 0.003 * s) for s in range(1, steps + 1)],
            "learning_rate": [(s, 1e-4) for s in range(1, steps + 1)],
            "mask_learning_rate": [(s, 5e-3) for s in range(1, steps + 1)]}


def panel(fig, title_start: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


def test_no_axis_zooms_a_small_change_into_a_steep_trend():
    fig = plot_training.training_figure(lambda_search_series(), "run")
    assert panel(fig, "mask sparsity").get_ylim() == (0, 100) and panel(fig, "decided gates").get_ylim() == (0, 100)
    for title in ("MLM + NSP loss", "mask penalty", "learning rate of the model", "learning rate of the mask"):
        low, high = panel(fig, title).get_ylim()
        assert low == 0 and high > 0, title  # 9.81-9.84 drawn on 0-10, not as a cliff
    low, high = panel(fig, "mask penalty").get_ylim()
    assert 9.84 < high < 11


def test_the_two_learning_rates_have_their_own_panels_and_every_line_a_label():
    fig = plot_training.training_figure(lambda_search_series(), "run")
    model, mask = panel(fig, "learning rate of the model"), panel(fig, "learning rate of the mask logits")
    assert [line.get_label() for line in model.lines] == ["learning_rate"]
    assert [line.get_label() for line in mask.lines] == ["mask_learning_rate"]
    assert all(not line.get_label().startswith("_") for ax in fig.axes for line in ax.lines
               if len(line.get_xdata()) > 2)  # matplotlib names unlabelled lines "_child<k>"


def test_a_target_search_draws_expected_deterministic_binarised_and_target_sparsity():
    series = lambda_search_series(10)
    series["mask_sparsity"] = [(s, 0.8) for s in range(1, 11)]  # binarised at the target's budget
    series["target_sparsity"] = [(s, 0.5 + 0.03 * s) for s in range(1, 11)]
    labels = [line.get_label() for line in panel(plot_training.training_figure(series, "t"), "mask sparsity").lines]
    assert labels == ["binarised mask (what fine-tuning uses)", "1[a > 0] (before any budget)",
                      "expected under the sampler (mean of 1 - σ(a))", "target (warmed up)"]
    # A λ search binarises at 1[a > 0]: one line for both, not one hidden under the other.
    labels = [line.get_label() for line in panel(plot_training.training_figure(lambda_search_series(10), "l"),
                                                 "mask sparsity").lines]
    assert labels == ["binarised mask = 1[a > 0] (what fine-tuning uses)",
                      "expected under the sampler (mean of 1 - σ(a))"]


def test_dense_or_old_log_still_plots(tmp_path):
    log = tmp_path / "dllogger.json"
    write_log(log, [step_line(s, 10.0 - s) for s in (1, 2, 3)])  # no mask keys: an older log
    series = plot_training.training_series(plot_training.read_log(log))
    assert set(series) == {"average_loss", "step_loss", "learning_rate", "mask_learning_rate"}
    out = tmp_path / "curves.png"
    plot_training.main([str(log), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('DLLL {"step": "PARAMETER", "data": {"Config": "{}"}}\n', "has no training lines"),
    ('DLLL {"step": [0, 1], "data": {"average_loss": 1.0}}\nDLLL {"step": [0, 2', "a line that is not JSON"),
])
def test_plot_training_errors_are_one_line(tmp_path, capsys, content, message):
    log = tmp_path / "dllogger.json"
    if content is not None:
        log.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_training.main([str(log)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "training_curves.png").exists()


def red_pixels(png: Path) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(plot_masks.DIAGONAL_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=-1) <= 6).sum())


def test_a_dropped_diagonal_is_drawn_red_and_the_title_states_the_finding(tmp_path):
    keeps, drops = banded(1, 4, 64, 3), banded(1, 4, 64, 3)
    drops[0, 1:] &= ~torch.eye(64, dtype=torch.bool)  # heads 1-3 drop their diagonal, head 0 keeps it
    pngs = {}
    for name, mask in (("keeps", keeps), ("drops", drops)):
        am.save_mask_file(tmp_path / f"{name}.safetensors", mask, {"mode": "dam_s"})
        pngs[name] = plot_masks.plot_mask_file(str(tmp_path / f"{name}.safetensors"), str(tmp_path / f"{name}.png"))[0]
    # The bar of offset 0 and the corner's frames are red in both; three maps' diagonals only where dropped.
    assert red_pixels(pngs["drops"]) - red_pixels(pngs["keeps"]) >= 3 * 64 * 2
    assert plot_masks.finding(drops) == "main diagonal kept 0.25 (dropped in 3 of 4 heads); offset 1: 1.00; " \
                                        "offsets 2-63: 0.03"
    assert plot_masks._map_title("head 1", drops[0, 1]) == "head 1: 91% dropped, diagonal dropped"


def test_the_offset_panels_span_0_to_1_with_a_line_at_one_half():
    import matplotlib.pyplot as plt

    kept = am.offset_keep_fraction(banded(2, 3, 32, 2))
    fig, (bars, lines) = plt.subplots(1, 2)
    plot_masks._draw_first_offsets(bars, kept.mean(dim=(0, 1)))
    plot_masks._draw_all_offsets(lines, kept, shared=False)
    for ax in (bars, lines):
        assert ax.get_ylim()[0] == 0.0 and 1.0 < ax.get_ylim()[1] <= 1.2  # room for the printed values
        assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.lines)  # the ½ line
    assert [t.get_text() for t in bars.texts][:2] == ["1.00", "1.00"]  # offsets 0 and 1 printed
    assert "offsets 0-15 of 0-31" in bars.get_title()  # the cut is stated
    plt.close(fig)


@pytest.mark.parametrize("name, content", [("ckpt_8.pt", b"PK\x03\x04rest"), ("weights", b"\x80\x02rest")])
def test_a_checkpoint_given_to_plot_masks_points_to_export(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_masks.main([str(tmp_path / name), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "is a checkpoint, not a mask file" in err
    assert f"python attention_masks.py export --checkpoint {tmp_path / name} --out" in err
