"""The gpu-backprop command end to end, through a subprocess."""
import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gpu_backprop.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**__import__("os").environ, "GPU_BACKPROP_DEVICE": "auto"})


def test_train_json_on_digits(tmp_path):
    proc = run("train", "--json", "--save", str(tmp_path / "m.npz"), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["dataset"] == "digits" and result["epochs"] == 30
    assert result["test_accuracy"] >= 0.95
    for key in ("device", "dtype", "seconds", "seconds_per_epoch", "train_loss", "test_loss"):
        assert key in result
    assert result["device"] != "cpu" or result["gemm_paths"] == {}  # one way only on the CPU

    np.savez(tmp_path / "new.npz", X=np.random.default_rng(0).random((5, 64)) * 16, y=np.arange(5))
    pred = run("predict", "--model", str(tmp_path / "m.npz"), "--data", str(tmp_path / "new.npz"), "--json")
    assert pred.returncode == 0, pred.stderr
    out = json.loads(pred.stdout)
    assert out["n"] == 5 and len(out["predictions"]) == 5 and 0 <= out["accuracy"] <= 1


def test_train_text_output_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    proc = run("train", "--epochs", "3", "--hidden", "16,8", "--plot", str(tmp_path / "c.png"))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "ms per epoch" in proc.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info():
    proc = run("info", "--json")
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert info["device"] in ("cpu", "cuda:0") and info["reason"]


@pytest.mark.parametrize("args,message", [
    (["train", "--hidden", "x"], "--hidden"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--activation", "swish"], "activation: expected one of"),
    (["train", "--loss", "hinge"], "loss: expected one of"),
    (["train", "--data", "/nonexistent.npz"], "no such file"),
    (["train", "--device", "cuda:7"], "device 'cuda:7' unavailable"),
    (["train", "--device", "tpu"], "device: expected"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["predict", "--model", "/nonexistent.npz", "--data", "/nonexistent.csv"], "cannot read"),
    ([], "required"),
])
def test_bad_usage_exits_2_with_one_line(args, message):
    proc = run(*args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("gpu_backprop: device")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_bad_data_file_exits_2(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,x,1\n")
    proc = run("train", "--data", str(tmp_path / "d.csv"), "--label", "label")
    assert proc.returncode == 2 and "non-numeric" in proc.stderr
    np.savez(tmp_path / "nan.npz", X=np.array([[np.nan, 1.0]] * 4), y=np.array([0, 1, 0, 1]))
    proc = run("train", "--data", str(tmp_path / "nan.npz"))
    assert proc.returncode == 2 and "X: contains NaN or Inf" in proc.stderr


def test_resume_continues_a_checkpointed_run_to_the_same_model(tmp_path):
    """2 epochs with --checkpoint, then --resume to 4: the saved model equals 4 epochs in one run, bit
    for bit (CPU); a resume with another batch size is refused, naming --resume."""
    common = ["train", "--device", "cpu", "--optimizer", "adamw", "--weight-decay", "0.01", "--lr", "0.01",
              "--schedule", "invscaling", "--json"]
    whole = run(*common, "--epochs", "4", "--save", str(tmp_path / "whole.npz"))
    assert whole.returncode == 0, whole.stderr
    first = run(*common, "--epochs", "2", "--checkpoint", str(tmp_path / "ckpt.npz"))
    assert first.returncode == 0, first.stderr
    resumed = run(*common, "--epochs", "4", "--resume", str(tmp_path / "ckpt.npz"), "--save", str(tmp_path / "r.npz"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "r.npz")
    for key in ("W0", "b0", "W1", "b1"):
        np.testing.assert_array_equal(a[key], b[key])
    assert json.loads(resumed.stdout)["test_accuracy"] == json.loads(whole.stdout)["test_accuracy"]
    other = run(*common, "--epochs", "4", "--batch-size", "16", "--resume", str(tmp_path / "ckpt.npz"))
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert other.stderr.startswith("gpu-backprop: error: --resume ") and "batch_size=32" in other.stderr
    # cosine's rates depend on the total of epochs: a checkpoint of a 2-epoch cosine run cannot go on to 4
    run(*common[:-2], "cosine", "--json", "--epochs", "2", "--checkpoint", str(tmp_path / "cos.npz"))
    cosine = run(*common[:-2], "cosine", "--epochs", "4", "--resume", str(tmp_path / "cos.npz"))
    assert cosine.returncode == 2 and "epochs=2, this one has 4" in cosine.stderr
