"""The per-shape path choice: timed once, cached on disk, off with GPU_BACKPROP_AUTOTUNE=0."""
import json
import logging

from gpu_backprop.ops.autotune import Tuner

TIMES = {"small": 3.0, "large": 2.0, "cublas": 1.0}


def fake_timer(record):
    def timer(fn):
        fn()
        return TIMES[record[-1]]
    return timer


def test_fastest_candidate_is_chosen_and_cached(tmp_path):
    record = []
    tuner = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    choice = tuner.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small")
    assert choice == "cublas" and record == list(TIMES)
    assert json.loads((tmp_path / "a.json").read_text()) == {"H100": {"forward|float32|256x1024x784": "cublas"}}
    again = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    record.clear()
    assert again.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small") == "cublas"
    assert record == []  # from the cache: nothing timed
    other_card = Tuner("H200", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    other_card.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small")
    assert record == list(TIMES)  # another device tunes for itself
    assert set(json.loads((tmp_path / "a.json").read_text())) == {"H100", "H200"}


def test_environment_turns_tuning_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_BACKPROP_AUTOTUNE", "0")
    record = []
    tuner = Tuner("H100", fake_timer(record), path=tmp_path / "a.json")
    assert tuner.choose("k", list(TIMES), record.append, default="large") == "large"
    assert record == [] and not (tmp_path / "a.json").exists()


def test_unwritable_cache_is_only_logged(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    record = []
    tuner = Tuner("H100", fake_timer(record), enabled=True, path=blocker / "sub" / "a.json")
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert tuner.choose("k", list(TIMES), record.append, default="small") == "cublas"
    assert any("cache not written" in r.getMessage() for r in caplog.records)


def test_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{not json")
    record = []
    assert Tuner("H100", fake_timer(record), enabled=True, path=path).choose(
        "k", list(TIMES), record.append, default="small") == "cublas"
    assert json.loads(path.read_text()) == {"H100": {"k": "cublas"}}


def test_a_candidate_that_fails_is_skipped(tmp_path, caplog):
    record = []

    def trial(candidate):
        record.append(candidate)
        if candidate == "cublas":
            raise AttributeError("module has no attribute 'setMathMode'")

    tuner = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert tuner.choose("k", list(TIMES), trial, default="small") == "large"
    assert "cublas failed (AttributeError" in caplog.text
    assert json.loads((tmp_path / "a.json").read_text()) == {"H100": {"k": "large"}}

    def broken(candidate):
        raise RuntimeError("no kernel")

    assert Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "b.json").choose(
        "k", list(TIMES), broken, default="small") == "small"
