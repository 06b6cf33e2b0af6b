"""The benchmark suite runs (smallest size, a few rounds), the report reads what it
writes, and the committed results documents are generated, never hand-edited."""
import json
import subprocess
import sys

from benchmarks import report, update_docs


def test_suite_smoke_and_report(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-k", "small", "--bench-device", "cpu",
                           "--bench-budget", "0.01", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          capture_output=True, text=True, cwd=update_docs.HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    peers = {b["extra_info"]["peer"] for b in data["benchmarks"]}
    assert {"numpy", "ours-numpy"} <= peers
    step = [b for b in data["benchmarks"] if b["group"] == "train_step small" and b["extra_info"]["peer"] == "ours-numpy"]
    assert step and step[0]["extra_info"]["speedup_vs"]["numpy"] > 0 and step[0]["extra_info"]["gflops"] > 0
    text = report.markdown(report.load(out))
    assert "| train_step | small | ours-numpy |" in text and "% of GEMM" in text
    assert report.main([str(out), "--png", str(tmp_path / "c.png")]) == 0
    lines = report.compare(report.load(out), report.load(out))  # a run against itself
    assert any(line.startswith("train_step small ours-numpy: ") for line in lines)
    assert lines and all(line.endswith("(1.00x)") for line in lines)
    assert report.main(["--compare", str(out), str(out)]) == 0


def test_report_rejects_other_json(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    assert report.main([str(tmp_path / "x.json")]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_results_documents_are_generated():
    assert update_docs.main(["--check"]) == 0, "run: python -m benchmarks.update_docs"
