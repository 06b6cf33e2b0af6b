"""Turn a pytest-benchmark JSON into a Markdown table and a PNG chart.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--png chart.png] [--markdown table.md]
    python -m benchmarks.report --compare BASE.json NOW.json    # two revisions timed on one machine

Every figure comes from the JSON (the same run): time per call, GB/s or
GFLOP/s, percent of the ceiling measured in that run, speed-up against each
other implementation of the same operation and size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ["ours-graph", "ours-fused", "ours-splitk", "ours-warp", "ours-tf32", "ours-bf16", "ours-numpy", "cupy-unfused", "numpy",
         "torch-eager", "torch-autograd", "torch-compile", "cublas-tf32", "torch-tf32", "torch-bf16",
         "torch-autocast-bf16", "torch-autograd-bf16", "torch-compile-bf16"]
# The benchmark targets of the issues, one headline row each (op, size): ours at its best (any of our
# float32 paths) against the best other implementation of the same run.
TARGETS = [("delta_hidden", "2^26"), ("delta_output", "2^26"), ("weight_grad_sgd", "typical-B4096"),
           ("gemm_core", "4096^3"), ("propagate", "typical-B4096"), ("train_step", "small"),
           ("train_step", "typical-B256"), ("train_step", "typical-B4096"), ("digits_epoch", "64-64-10 B=32")]
OURS = ("ours-graph", "ours-fused", "ours-splitk", "ours-numpy")  # ours-tf32 computes in another precision
# The tensor-core targets (issue 13), one row each where the run holds both sides: ours at its best in
# that precision against the fastest of the named peers, and the ratio the target asks for.
TENSOR_TARGETS = [("gemm_core", "4096^3", "tf32", ("cublas-tf32", "torch-tf32"), 0.80),
                  ("gemm_core", "4096^3", "bf16", ("torch-bf16",), 0.80),
                  ("train_step", "typical-B4096", "bf16", ("torch-autocast-bf16", "torch-autograd-bf16"), 1.30),
                  ("train_step", "typical-B4096", "bf16", ("torch-compile-bf16",), 1.00)]


def load(*paths: "str | Path") -> dict:
    """One or more pytest-benchmark JSON files of one run, merged."""
    merged: dict = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks')")
        if not merged:
            merged = data
        else:
            merged["benchmarks"] = merged["benchmarks"] + data["benchmarks"]
    return merged


def rows(data: dict) -> list[dict]:
    out = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "peer" not in info:
            continue
        out.append({"op": info["op"], "size": info["size"], "peer": info["peer"], "time_s": info["time_s"],
                    "timer": info.get("timer", ""), "gbs": info.get("gbs"), "gflops": info.get("gflops"),
                    "pct_copy": info.get("pct_copy_ceiling"), "pct_gemm": info.get("pct_gemm_ceiling"),
                    "speedup": info.get("speedup_vs") or {}, "device": info.get("device", ""),
                    # runs before precision was recorded: all float32 but ours-tf32
                    "precision": info.get("precision") or ("tf32" if info["peer"] == "ours-tf32" else "fp32"),
                    "copy_ceiling": info.get("copy_ceiling_gbs"), "gemm_ceiling": info.get("gemm_ceiling_gflops")})
    rank = {p: i for i, p in enumerate(ORDER)}
    out.sort(key=lambda r: (r["op"], _size_key(r["size"]), rank.get(r["peer"], 99)))
    return out


def _size_key(size: str) -> tuple:
    order = ["small", "typical-B256", "typical-B4096", "large", "2^26", "4096^3"]
    return (order.index(size) if size in order else 99, size)


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _rate(row: dict) -> tuple[str, str]:
    if row["op"] in ("delta_hidden", "delta_output") and row["gbs"]:
        return f"{row['gbs']:.0f} GB/s", f"{row['pct_copy']:.0f}% of copy"
    if row["gflops"]:
        return f"{row['gflops']:.0f} GFLOP/s", f"{row['pct_gemm']:.0f}% of GEMM"
    return "", ""


def markdown(data: dict) -> str:
    table = rows(data)
    if not table:
        raise ValueError("no gpu_backprop benchmark rows in this JSON")
    first = table[0]
    machine = data.get("machine_info", {})
    lines = [f"Device: **{first['device']}**; ceilings measured in the same run: copy "
             f"{first['copy_ceiling']:.0f} GB/s (read + write), GEMM {first['gemm_ceiling']:.0f} GFLOP/s. "
             f"Float32. Run {data.get('datetime', '?')[:19]} on {machine.get('node', '?')}, "
             f"Python {machine.get('python_version', '?')}.", "",
             "| operation | size | implementation | time | rate | of ceiling | speed-up vs others (same run) |",
             "|---|---|---|---|---|---|---|"]
    for row in table:
        rate, pct = _rate(row)
        speedups = ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(row["speedup"].items(),
                                                                      key=lambda kv: ORDER.index(kv[0])
                                                                      if kv[0] in ORDER else 99))
        lines.append(f"| {row['op']} | {row['size']} | {row['peer']} | {_time(row['time_s'])} | {rate} | {pct} | "
                     f"{speedups} |")
    timers = sorted({r["timer"] for r in table if r["timer"]})
    lines += ["", f"Time: {'; '.join(timers)} over rotated input sets larger than the cache; "
                  "speed-up = other time / this time."]
    return "\n".join(lines) + "\n"


def headline(data: dict) -> str:
    """One row per benchmark target: our fastest float32 path, the fastest other float32
    implementation, their ratio (> 1: ours faster), ours against the run's measured ceiling, and
    the card; then the tensor-core targets the run can tell (TENSOR_TARGETS)."""
    table = rows(data)
    lines = ["| operation | size | ours | best other | ours vs it | ours, of the ceiling | card |",
             "|---|---|---|---|---|---|---|"]
    for op, size in TARGETS:
        here = [r for r in table if r["op"] == op and r["size"] == size]
        ours = min((r for r in here if r["peer"] in OURS), key=lambda r: r["time_s"], default=None)
        other = min((r for r in here if not r["peer"].startswith("ours") and r["precision"] == "fp32"),
                    key=lambda r: r["time_s"], default=None)
        if ours is None:
            continue
        versus = f"{other['peer']} {_time(other['time_s'])}" if other else "-"
        ratio = f"**{other['time_s'] / ours['time_s']:.2f}x**" if other else "-"
        lines.append(f"| {op} | {size} | {ours['peer']} {_time(ours['time_s'])} | {versus} | {ratio} | "
                     f"{_rate(ours)[1] or '-'} | {ours['device']} |")
    for op, size, precision, peers, target in TENSOR_TARGETS:
        here = [r for r in table if r["op"] == op and r["size"] == size and r["precision"] == precision]
        ours = min((r for r in here if r["peer"].startswith("ours")), key=lambda r: r["time_s"], default=None)
        other = min((r for r in here if r["peer"] in peers), key=lambda r: r["time_s"], default=None)
        if ours is None or other is None:
            continue
        lines.append(f"| {op} ({precision}) | {size} | {ours['peer']} {_time(ours['time_s'])} | {other['peer']} "
                     f"{_time(other['time_s'])} | **{other['time_s'] / ours['time_s']:.2f}x** (target "
                     f"{target:.2f}x) | {_rate(ours)[1] or '-'} | {ours['device']} |")
    return "\n".join(lines) + "\n"


def compare(base: dict, now: dict) -> list[str]:
    """``op size peer: base time -> now time (speed-up)`` for every figure both runs hold
    (meaningful only for two runs on the same machine, e.g. device_check.sh's baseline)."""
    before = {(r["op"], r["size"], r["peer"]): r["time_s"] for r in rows(base)}
    lines = []
    for row in rows(now):
        old = before.get((row["op"], row["size"], row["peer"]))
        if old is not None:
            lines.append(f"{row['op']} {row['size']} {row['peer']}: {_time(old)} -> {_time(row['time_s'])} "
                         f"({old / row['time_s']:.2f}x)")
    return lines


def chart(data: dict, path: "str | Path") -> Path:
    """One panel per operation: each implementation's time relative to ours, per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = rows(data)
    ops = sorted({r["op"] for r in table})
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sub = [r for r in table if r["op"] == op]
        sizes = sorted({r["size"] for r in sub}, key=_size_key)
        peers = [p for p in ORDER if any(r["peer"] == p for r in sub)]
        width = 0.8 / max(len(peers), 1)
        def time_of(size: str, peer: str) -> float:
            return next((r["time_s"] for r in sub if r["size"] == size and r["peer"] == peer), np.nan)

        ours = [next((time_of(s, p) for p in ("ours-graph", "ours-fused", "ours-numpy") if not np.isnan(time_of(s, p))), np.nan)
                for s in sizes]
        for i, peer in enumerate(peers):
            relative = np.array([time_of(s, peer) for s in sizes]) / np.array(ours)
            ax.bar(np.arange(len(sizes)) + i * width, relative, width, label=peer)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(sizes)) + width * (len(peers) - 1) / 2, sizes)
        ax.set_ylabel("time / ours")
        ax.set_title(op, loc="left", fontsize=10)
        ax.legend(fontsize=7, ncol=min(len(peers), 4))
    fig.suptitle(f"gpu_backprop benchmarks: {table[0]['device']}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="*", help="pytest-benchmark JSON files (--benchmark-json) of one run")
    parser.add_argument("--png", help="chart path (default: RESULTS with .png)")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--compare", nargs=2, metavar=("BASE", "NOW"),
                        help="print base -> now for each figure in both (two revisions, one machine)")
    args = parser.parse_args(argv)
    if args.compare:
        try:
            print("\n".join(compare(load(args.compare[0]), load(args.compare[1]))))
        except (OSError, ValueError) as exc:
            print(f"benchmarks.report: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.results:
        parser.error("give RESULTS.json files, or --compare BASE NOW")
    try:
        data = load(*args.results)
        text = markdown(data)
    except (OSError, ValueError) as exc:
        print(f"benchmarks.report: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    try:
        png = chart(data, args.png or Path(args.results[0]).with_suffix(".png"))
        print(f"chart: {png}", file=sys.stderr)
    except ImportError:
        print('benchmarks.report: no chart: matplotlib missing (pip install "gpu_backprop[plot]")', file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
