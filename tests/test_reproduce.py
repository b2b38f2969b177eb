"""scripts/reproduce.py: the matched-sparsity comparison end to end at its smallest size, every artefact checked."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--preset", "smoke", "--searches", "dam_s", "--patterns", "star", "--seeds", "1", "2"]
DIFFERENCE = re.compile(r"([+-]\d+\.\d+) ± (\d+\.\d+) \((DAM better|pattern better|within noise)\)")


def run_reproduce(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/reproduce.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)


def tables(results: str) -> list[dict[str, list[str]]]:
    """Each markdown table of `results` as {first cell: the other cells} (header row left out)."""
    found, current = [], None
    for line in results.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = {}
            found.append(current)
            continue  # the header
        if "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            current[cells[0]] = cells[1:]
    return found


def check_difference(cell: str) -> None:
    value, se, verdict = DIFFERENCE.fullmatch(cell).groups()
    assert float(se) >= 0
    assert (verdict == "within noise") == (abs(float(value)) <= 2 * float(se))


@pytest.mark.slow
def test_smoke_reproduction_writes_the_pairs_noise_verdict_plot_and_finding_and_resumes(tmp_path):
    out = tmp_path / "repro"
    first = run_reproduce(*SMALL, "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    # the overall progress line: every stage announced, then "stage k of N" with the time left
    total = int(re.search(r"\[reproduce\] (\d+) stages to run, about ", first.stdout).group(1))
    assert f"[reproduce] stage {total} of {total}: " in first.stdout and "left" in first.stdout
    results = (out / "results.md").read_text()
    assert "Command: `python scripts/reproduce.py --preset smoke" in results and "Seeds: 1, 2." in results
    assert "no number below is a result" in results  # the smoke preset says what it is
    runs, pairs = tables(results)
    assert list(runs) == ["dense", "star", "DAM_s @ star"]
    for name, (sparsity, loss, se, sst2) in runs.items():
        assert (float(sparsity) == 0.0) == (name == "dense")
        mean, std = map(float, re.fullmatch(r"(\S+) ± (\S+)", loss).groups())
        assert 0 < mean < 20 and std >= 0 and float(se) > 0  # a finite cross-entropy over a 30k vocab
        assert re.fullmatch(r"\d+\.\d ± \d+\.\d( \(chance\))?", sst2)  # two seeds: the ± is always shown
    assert runs["star"][0] == runs["DAM_s @ star"][0]  # matched sparsity
    (dam, loss_diff, sst2_diff), = [pairs["star"][1:]]
    assert dam == "DAM_s @ star"
    check_difference(loss_diff)
    check_difference(sst2_diff)
    assert re.search(r"\*\*DAM_s, held-out MLM loss\*\*: its masks were better than the pattern beyond the noise in "
                     r"\d of 1 pairs, worse in \d, within the noise in \d\.", results)
    assert "At matched sparsity, on held-out MLM loss, the searched masks were better" in results
    assert re.search(r"\*\*DAM_s @ star\*\* \(shared by every layer\): Main diagonal dropped in \d+ of 12 heads",
                     results)
    assert (out / "offsets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "search" / "dam_s_target0.8" / "attention_mask.png").is_file()
    # the searches and continued runs all start from the one checkpoint the head stage wrote
    start = str(out / "heads" / "ckpt_2.pt")
    runs = ("search/dam_s_target0.8", "continue/dense/seed1", "continue/star/seed2", "continue/DAM_s_at_star/seed1")
    for run in runs:
        assert start in (out / run / "dllogger.json").read_text(), run

    again = run_reproduce(*SMALL, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "glue_star_sst-2_seed2: done before, skipped" in again.stdout and " ...\n" not in again.stdout
    assert (out / "results.md").read_text() == results


def test_unknown_pattern_is_one_line_naming_the_choices():
    result = run_reproduce("--patterns", "star,stars", "--out", "/nonexistent/never_written")
    assert result.returncode == 2
    assert "unknown --patterns / --searches / --tasks entries ['stars']" in result.stderr
    assert "Traceback" not in result.stderr and not Path("/nonexistent/never_written").exists()


def test_one_seed_is_refused_the_noise_needs_two():
    result = run_reproduce("--seeds", "1", "--out", "/nonexistent/never_written")
    assert result.returncode == 2 and "--seeds needs at least two values" in result.stderr
