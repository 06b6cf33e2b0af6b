"""The benchmark suite runs (smallest size, a few rounds), the report reads what it
writes, and the committed results documents are generated, never hand-edited."""
import json
import os
import re
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


# results 1% off, as a wrong kernel or step would give them: every benchmark's check must catch it
WRONG_RESULTS = """
import benchmarks.measure as measure
right = measure.to_host
measure.to_host = lambda value: right(value) * 1.01
"""


def test_disabled_benchmarks_run_once_and_check_their_results(tmp_path):
    """pytest-benchmark's --benchmark-disable runs each benchmark once as a test: checked, untimed."""
    (tmp_path / "wrong_results.py").write_text(WRONG_RESULTS)
    outcomes = []
    for plugins in ([], ["-p", "wrong_results"]):
        proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-k", "small and numpy",
                               "--bench-device", "cpu", "--benchmark-disable", "-p", "no:cacheprovider", *plugins],
                              capture_output=True, text=True, cwd=update_docs.HERE.parent,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(update_docs.HERE.parent)])})
        counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|error)", proc.stdout))
        outcomes.append((proc.returncode, counts, proc.stdout[-3000:] + proc.stderr[-3000:]))
    (rc, counts, out), (rc_wrong, counts_wrong, out_wrong) = outcomes
    assert rc == 0 and counts.get("passed", 0) >= 8 and "Benchmark fixture was not used" not in out, out
    assert rc_wrong == 1 and counts_wrong.get("failed") == counts["passed"], out_wrong
    assert "differs from the float64 reference" in out_wrong, out_wrong


def test_report_rejects_other_json(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    assert report.main([str(tmp_path / "x.json")]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_results_documents_are_generated():
    assert update_docs.main(["--check"]) == 0, "run: python -m benchmarks.update_docs"


def test_headline_takes_our_fastest_float32_path_against_the_fastest_other():
    def bench(op, size, peer, seconds):
        return {"extra_info": {"op": op, "size": size, "peer": peer, "time_s": seconds, "device": "Card X",
                               "gflops": 1.0, "pct_gemm_ceiling": 42.0}}
    data = {"benchmarks": [bench("gemm_core", "4096^3", "ours-fused", 4.0), bench("gemm_core", "4096^3", "ours-splitk", 2.0),
                           bench("gemm_core", "4096^3", "ours-tf32", 0.5),  # another precision: not a headline
                           bench("gemm_core", "4096^3", "cupy-unfused", 3.0), bench("gemm_core", "4096^3", "torch-eager", 5.0)]}
    rows = [line for line in report.headline(data).splitlines() if line.startswith("| gemm_core")]
    assert rows == ["| gemm_core | 4096^3 | ours-splitk 2.00 s | cupy-unfused 3.00 s | **1.50x** | 42% of GEMM | Card X |"]
