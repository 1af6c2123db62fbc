"""kd_seg.py: the --quick smoke run of the whole demo pipeline, and its clear errors."""
import json

from conftest import run_cli


def test_quick_demo_writes_table_report_and_pictures(tmp_path):
    out, data = tmp_path / "quick", tmp_path / "data"
    r = run_cli("kd_seg.py", "--quick", "--out", out, "--data-root", data, "--jobs", 2, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results]
    assert names[:2] == ["teacher", "baseline"] and "mgd" in names and "zhu" in names
    assert all(0 <= row["mean"] <= 100 for row in results)
    report = (out / "REPORT.md").read_text()
    assert "| baseline |" in report and "python kd_seg.py --quick" in report
    assert (out / "predictions.png").stat().st_size > 0
    assert (out / "pseudo_label_diagnostics.png").stat().st_size > 0
    # a second run reuses every finished training instead of redoing it
    again = run_cli("kd_seg.py", "--quick", "--out", out, "--data-root", data, "--rows", "baseline",
                    timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "baseline seed 0 done" in again.stdout


def test_unknown_row_is_one_line_error(tmp_path):
    r = run_cli("kd_seg.py", "--quick", "--rows", "baseline,telepathy", "--out", tmp_path / "q")
    assert r.returncode == 2 and "telepathy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()
