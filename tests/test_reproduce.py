"""scripts/reproduce.py: the paper's experiment end to end at its smallest size, every artefact checked."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--preset", "smoke", "--searches", "dam_s", "--patterns", "star", "--seeds", "1", "2"]


def run_reproduce(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/reproduce.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)


def table_rows(results: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in results.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_smoke_reproduction_writes_the_table_plot_and_finding_and_resumes(tmp_path):
    out = tmp_path / "repro"
    first = run_reproduce(*SMALL, "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    results = (out / "results.md").read_text()
    rows = table_rows(results)
    assert list(rows) == ["dense", "DAM_s λ=0.0001", "star"]
    for name, (sparsity, loss, sst2, cola, average) in rows.items():
        assert (float(sparsity) == 0.0) == (name == "dense")
        assert 0 < float(loss) < 20  # a finite cross-entropy over a 30k vocab
        for cell in (sst2, cola, average):  # two seeds: mean ± std, scores in percent
            mean, std = map(float, re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
            assert -100 <= mean <= 100 and std >= 0  # MCC may be negative
    assert re.search(r"\*\*DAM_s λ=0.0001\*\*: Main diagonal dropped in \d+ of 12 heads;", results)
    assert (out / "offsets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "search" / "dam_s_lam0.0001" / "attention_mask.png").is_file()
    # the searches and continued runs all start from the one checkpoint the head stage wrote
    start = str(out / "heads" / "ckpt_2.pt")
    for run in ("search/dam_s_lam0.0001", "continue/dense", "continue/star"):
        assert start in (out / run / "dllogger.json").read_text(), run

    again = run_reproduce(*SMALL, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "glue_star_cola_seed2: done before, skipped" in again.stdout and " ...\n" not in again.stdout
    assert (out / "results.md").read_text() == results


def test_unknown_pattern_is_one_line_naming_the_choices():
    result = run_reproduce("--patterns", "star,stars", "--out", "/nonexistent/never_written")
    assert result.returncode == 2
    assert "unknown --patterns / --searches entries ['stars']" in result.stderr and "Traceback" not in result.stderr
    assert not Path("/nonexistent/never_written").exists()
