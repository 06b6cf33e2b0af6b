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


def test_headline_tensor_core_rows_compare_within_one_precision():
    def bench(peer, seconds, precision):
        return {"extra_info": {"op": "gemm_core", "size": "4096^3", "peer": peer, "time_s": seconds, "device": "Card X",
                               "gflops": 1.0, "pct_gemm_ceiling": 42.0, "precision": precision}}
    data = {"benchmarks": [bench("ours-splitk", 2.0, "fp32"), bench("cupy-unfused", 3.0, "fp32"),
                           bench("ours-tf32", 0.5, "tf32"), bench("cublas-tf32", 0.4, "tf32"),
                           bench("torch-tf32", 0.45, "tf32"), bench("torch-bf16", 0.2, "bf16")]}
    rows = [line for line in report.headline(data).splitlines() if line.startswith("| gemm_core")]
    # float32 against float32 only; TF32 against cuBLAS TF32 with its target; no bf16 row without a bf16 of ours
    assert rows == ["| gemm_core | 4096^3 | ours-splitk 2.00 s | cupy-unfused 3.00 s | **1.50x** | 42% of GEMM | Card X |",
                    "| gemm_core (tf32) | 4096^3 | ours-tf32 500.00 ms | cublas-tf32 400.00 ms | **0.80x** (target 0.80x) "
                    "| 42% of GEMM | Card X |"]


def test_tensor_core_peers_are_listed_and_skip_on_the_cpu_with_their_reason():
    from benchmarks.peers import BF16_STEP_PEERS, PEERS, STEP_PEERS, TENSOR_GEMM_PEERS

    assert set(TENSOR_GEMM_PEERS) <= set(PEERS) and set(BF16_STEP_PEERS) <= set(STEP_PEERS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-rs", "-k",
                           "(gemm_core or typical-B4096) and (tf32 or bf16)", "--bench-device", "cpu",
                           "--benchmark-disable", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=update_docs.HERE.parent)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and " passed" not in out and "error" not in out.lower(), out
    for peer in TENSOR_GEMM_PEERS + BF16_STEP_PEERS:
        assert re.search(rf"SKIPPED \[\d+\] \S+: {peer} (needs a CUDA GPU|is a tensor-core peer \((tf32|bf16)\): "
                         rf"CUDA only)", out), (peer, out)


def test_bf16_step_check_admits_bf16_rounding_and_catches_a_wrong_update():
    """The bf16 step peers are checked on their update (peers.BF16_STEP_TOL): our bf16 twin
    (precision="bf16" on the CPU: bf16 GEMM operands, float32 sums, as autocast's GEMMs) passes; a
    first-layer update 10% too large fails that check, and passes the float32 parameter check."""
    import numpy as np
    import pytest

    from benchmarks.harness import check
    from benchmarks.peers import BF16_STEP_TOL, LR, SIZES
    from benchmarks.test_train_step import initial, numpy_sigmoid, plain_step, update_check
    from gpu_backprop import MLP

    size = "typical-B256"
    weights, biases, X, Y = initial(size, np.random.default_rng(0))
    ref = plain_step({"W": [w.copy() for w in weights], "b": [b.copy() for b in biases]}, X, Y, numpy_sigmoid)
    reference = {f"W{k}": w for k, w in enumerate(ref["W"])} | {f"b{k}": b for k, b in enumerate(ref["b"])}
    model = MLP(SIZES[size][0], device="cpu", dtype="float32", seed=0, precision="bf16")
    model.set_params({f"W{k}": w for k, w in enumerate(weights)} | {f"b{k}": b for k, b in enumerate(biases)})
    model.train_step(X.astype(np.float32), Y.astype(np.float32), LR)
    ref_updates, updates = update_check(weights, biases, reference, lambda params: params)
    got = updates(model.get_params())
    check("bf16 twin", got, ref_updates, BF16_STEP_TOL)
    assert any(np.linalg.norm(got[k] - ref_updates[k]) > 1e-3 * np.linalg.norm(ref_updates[k]) for k in got)  # bf16

    wrong = {k: v.astype(np.float32) for k, v in reference.items()}
    wrong["W0"] = (weights[0] + 1.1 * (reference["W0"] - weights[0])).astype(np.float32)
    check("W0 update 10% off", wrong, reference, 1e-4)  # the parameters barely move: a parameter check misses it
    with pytest.raises(AssertionError, match="W0 differs from the float64 reference"):
        check("W0 update 10% off", updates(wrong), ref_updates, BF16_STEP_TOL)


def test_float32_step_check_sees_the_update_too():
    """The float32 and TF32 step peers are checked on their parameters and on their update
    (peers.STEP_UPDATE_TOL): our float32 CPU step passes both; a first-layer update 10% too large,
    which the parameters' 1e-4 passes, fails the update's."""
    import numpy as np
    import pytest

    from benchmarks.harness import check
    from benchmarks.peers import LR, SIZES, STEP_UPDATE_TOL
    from benchmarks.test_train_step import initial, numpy_sigmoid, plain_step, update_check
    from gpu_backprop import MLP

    size = "typical-B256"
    weights, biases, X, Y = initial(size, np.random.default_rng(0))
    ref = plain_step({"W": [w.copy() for w in weights], "b": [b.copy() for b in biases]}, X, Y, numpy_sigmoid)
    reference = {f"W{k}": w for k, w in enumerate(ref["W"])} | {f"b{k}": b for k, b in enumerate(ref["b"])}
    model = MLP(SIZES[size][0], device="cpu", dtype="float32", seed=0)
    model.set_params({f"W{k}": w for k, w in enumerate(weights)} | {f"b{k}": b for k, b in enumerate(biases)})
    model.train_step(X.astype(np.float32), Y.astype(np.float32), LR)
    ref_updates, updates = update_check(weights, biases, reference, lambda params: params)
    check("float32", model.get_params(), reference, 1e-4)
    check("float32", updates(model.get_params()), ref_updates, STEP_UPDATE_TOL)

    wrong = {k: v.astype(np.float32) for k, v in reference.items()}
    wrong["W0"] = (weights[0] + 1.1 * (reference["W0"] - weights[0])).astype(np.float32)
    check("W0 update 10% off", wrong, reference, 1e-4)
    with pytest.raises(AssertionError, match="W0 differs from the float64 reference"):
        check("W0 update 10% off", updates(wrong), ref_updates, STEP_UPDATE_TOL)
