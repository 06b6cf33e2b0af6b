"""The ``gpu-backprop`` command: train, predict, info.

Bad usage or bad input exits 2 with one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

import numpy as np

from . import __version__
from . import data as data_mod
from .device import DeviceError, describe, get_device
from .model import MLP

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage or input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 128,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return sizes


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive value, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-backprop", description="Train fully connected networks by backpropagation "
                     "on a GPU (fused CUDA kernels) or the CPU (NumPy).")
    parser.add_argument("--version", action="version", version=f"gpu_backprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an MLP (default: the bundled digits dataset)")
    train.add_argument("--data", default="digits",
                       help="digits | xor | regression | FILE.npz (arrays X, y) | FILE.csv (with --label)")
    train.add_argument("--label", help="target column of a CSV file")
    train.add_argument("--hidden", type=_hidden, default=[64], help="hidden widths, e.g. 128,64 (default 64)")
    train.add_argument("--activation", default="sigmoid", help="sigmoid | tanh | relu | identity")
    train.add_argument("--output", default=None, help="output activation (default: sigmoid for mse, "
                       "softmax for cross_entropy; identity for regression data)")
    train.add_argument("--loss", default="mse", help="mse | cross_entropy")
    train.add_argument("--lr", type=_positive(float), default=2.0, help="learning rate (default 2.0)")
    train.add_argument("--momentum", type=float, default=0.0, help="momentum in [0, 1) (default 0)")
    train.add_argument("--epochs", type=_positive(int), default=30)
    train.add_argument("--batch-size", type=_positive(int), default=32)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default $GPU_BACKPROP_DEVICE or auto)")
    train.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    train.add_argument("--precision", default="fp32", choices=["fp32", "tf32"],
                       help="tf32: float32 GEMMs on the tensor cores (CUDA only)")
    train.add_argument("--unfused", action="store_true", help="on CUDA, use the unfused CuPy path")
    train.add_argument("--no-graphs", action="store_true", help="on CUDA, do not replay steps from CUDA graphs")
    train.add_argument("--save", metavar="MODEL.npz", help="write the trained model here")
    train.add_argument("--plot", metavar="CURVES.png", help="plot loss and accuracy per epoch (needs [plot])")
    train.add_argument("--json", action="store_true", help="print one JSON object with the results, nothing else")

    predict = sub.add_parser("predict", help="predict with a saved model")
    predict.add_argument("--model", required=True, metavar="MODEL.npz")
    predict.add_argument("--data", required=True, metavar="FILE", help=".npz with X, or .csv")
    predict.add_argument("--label", help="a CSV column to drop (and score against)")
    predict.add_argument("--device", default=None)
    predict.add_argument("--json", action="store_true")

    info = sub.add_parser("info", help="versions, the chosen device and why")
    info.add_argument("--device", default=None)
    info.add_argument("--json", action="store_true")
    return parser


def _dataset(args: argparse.Namespace) -> data_mod.Dataset:
    if args.data in data_mod.BUILTIN:
        return data_mod.BUILTIN[args.data](seed=args.seed) if args.data != "xor" else data_mod.xor()
    return data_mod.from_file(args.data, args.label, seed=args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    if args.plot:
        _require_matplotlib()
    ds = _dataset(args)
    output = args.output or ("identity" if ds.task == "regression" else None)
    device = get_device(args.device)
    model = MLP([ds.X_train.shape[1], *args.hidden, ds.n_outputs], activation=args.activation, output=output,
                loss=args.loss, device=device, dtype=args.dtype, seed=args.seed, fused=not args.unfused,
                precision=args.precision)
    if not args.json:
        print(f"{model} on {ds.name}: {len(ds.X_train)} train / {len(ds.X_test)} test samples", file=sys.stderr)
    start = time.perf_counter()
    history = model.fit(ds.X_train, ds.y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        momentum=args.momentum, validation_data=(ds.X_test, ds.y_test), progress=not args.json,
                        graphs=False if args.no_graphs else None)
    seconds = time.perf_counter() - start
    test = model.evaluate(ds.X_test, ds.y_test)
    result = {
        "dataset": ds.name, "sizes": model.sizes, "activation": model.activation, "output": model.output,
        "loss_function": model.loss, "device": model.device.name, "device_reason": model.device.reason,
        "fused": model.ops.fused, "precision": model.precision, "graphs": bool(getattr(model.last_steps, "captured", 0)), "dtype": model.dtype.name, "epochs": history.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
        "train_loss": history.loss[-1], "train_accuracy": history.accuracy[-1],
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "seconds": seconds, "seconds_per_epoch": float(np.median(history.seconds)),
    }
    if args.save:
        path = model.save(args.save, x_mean=ds.mean, x_scale=ds.scale)
        result["saved"] = str(path)
    if args.plot:
        _plot(history, args.plot)
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result))
    else:
        accuracy = "" if test["accuracy"] is None else f"test accuracy {test['accuracy']:.4f}, "
        print(f"{accuracy}test loss {test['loss']:.4f}; {result['seconds_per_epoch'] * 1e3:.1f} ms per epoch "
              f"(median of {history.epochs}), {seconds:.2f} s in all on {model.device.name} ({model.dtype.name})")
        for key in ("saved", "plot"):
            if key in result:
                print(f"{key}: {result[key]}")
    return 0


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "gpu_backprop[plot]"') from None


def _plot(history: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, history.epochs + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history.loss, label="train")
    if history.val_loss:
        ax_loss.plot(epochs, history.val_loss, label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    if history.accuracy and history.accuracy[0] is not None:
        ax_acc.plot(epochs, history.accuracy, label="train")
        if history.val_accuracy:
            ax_acc.plot(epochs, history.val_accuracy, label="test")
        ax_acc.legend()
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    fig.tight_layout()
    _save_atomically(fig, path)
    plt.close(fig)


def _save_atomically(fig: Any, path: str) -> None:
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_predict(args: argparse.Namespace) -> int:
    model = MLP.load(args.model, device=args.device)
    X, y = data_mod.read_file(args.data, args.label)
    X = np.asarray(data_mod.check_features(X, model.sizes[0]), dtype=np.float64)
    extra = getattr(model, "extra", {})
    if "x_mean" in extra and "x_scale" in extra:  # the training set's standardisation
        X = (X - extra["x_mean"]) / extra["x_scale"]
    predictions = model.predict(X)
    result: dict[str, Any] = {"n": len(X), "predictions": predictions.tolist()}
    if y is not None:
        result.update(model.evaluate(X, y))
    if args.json:
        print(json.dumps(result))
    else:
        for p in predictions:
            print(" ".join(f"{v:.6g}" for v in np.atleast_1d(p)))
        if y is not None and result.get("accuracy") is not None:
            print(f"accuracy {result['accuracy']:.4f} on {len(X)} samples", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    device = get_device(args.device)
    info = {"gpu_backprop": __version__, "python": sys.version.split()[0], **describe(device)}
    try:
        import scipy
        import sklearn

        info.update(scipy=scipy.__version__, scikit_learn=sklearn.__version__)
    except ImportError:
        pass
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="gpu_backprop: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "predict": cmd_predict, "info": cmd_info}[args.command](args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, DeviceError, FloatingPointError) as exc:
        print(f"gpu-backprop: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
