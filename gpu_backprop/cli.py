"""The ``gpu-backprop`` command: train, predict, info.

Bad usage or bad input exits 2 with one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from . import __version__
from . import data as data_mod
from .device import DeviceError, describe
from .files import check_writable, write_atomically
from .model import MLP, check_memory, resolve_device, write_model

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage or input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _hidden(text: str) -> list[int]:
    # Every comma-separated field must be a width: "" and "3,,4" are mistakes, not "no layer".
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths like 128,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return sizes


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:  # what both NumPy's generators and scikit-learn's split accept
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _momentum(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and np.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive finite value, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-backprop", description="Train fully connected networks by backpropagation "
                     "on a GPU (fused CUDA kernels) or the CPU (NumPy).")
    parser.add_argument("--version", action="version", version=f"gpu_backprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an MLP (default: the bundled digits dataset)")
    train.add_argument("--data", default="digits",
                       help="digits | xor | regression | FILE.npz (arrays X, y) | FILE.csv (with --label); under "
                            "mpiexec, a name with {rank} (train-{rank}.npz): a file per rank, each reading its own")
    train.add_argument("--label", help="target column of a CSV file")
    train.add_argument("--hidden", type=_hidden, default=None,
                       help="hidden widths, e.g. 128,64 (default 64; xor: 8)")
    train.add_argument("--activation", default="sigmoid", help="sigmoid | tanh | relu | identity")
    train.add_argument("--output", default=None, help="output activation (default: sigmoid for mse, "
                       "softmax for cross_entropy; identity for regression data)")
    train.add_argument("--loss", default="mse", help="mse | cross_entropy")
    train.add_argument("--lr", type=_positive(float), default=None,
                       help="learning rate (default 2.0; regression targets: 0.05; xor: 4.0)")
    train.add_argument("--momentum", type=_momentum, default=0.0, help="momentum in [0, 1) (default 0)")
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"],
                       help="sgd (with --momentum, --nesterov) | adam | adamw (with --weight-decay); default sgd")
    train.add_argument("--nesterov", action="store_true", help="Nesterov's momentum (sgd with --momentum)")
    train.add_argument("--alpha", type=_non_negative, default=0.0, help="L2 penalty, as scikit-learn's (default 0)")
    train.add_argument("--weight-decay", type=_non_negative, default=0.0, help="adamw's decoupled weight decay")
    train.add_argument("--schedule", default="constant", choices=["constant", "invscaling", "adaptive", "cosine"],
                       help="learning-rate schedule per epoch (default constant)")
    train.add_argument("--early-stopping", type=_positive(int), metavar="PATIENCE", default=None,
                       help="stop once the test loss has not improved for PATIENCE epochs; keep the best epoch")
    train.add_argument("--checkpoint", metavar="CKPT.npz",
                       help="write a checkpoint after every epoch (a model file with the optimizer and RNG state)")
    train.add_argument("--resume", metavar="CKPT.npz", help="continue the run a --checkpoint file holds")
    train.add_argument("--distributed", default="auto", choices=["auto", "none", "mpi", "shm", "nccl"],
                       help="under mpiexec -n N: data-parallel over the N ranks (auto: NCCL on CUDA; on the CPU shm, "
                            "the parameters in shared memory, when the ranks share a machine, else MPI all-reduce; "
                            "needs gpu_backprop[mpi]); --batch-size is the global batch")
    train.add_argument("--epochs", type=_positive(int), default=None, help="(default 30; xor: 500)")
    train.add_argument("--batch-size", type=_positive(int), default=32)
    train.add_argument("--seed", type=_seed, default=0, help="in [0, 2**32) (default 0)")
    train.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default $GPU_BACKPROP_DEVICE or auto)")
    train.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    train.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                       help="tf32: float32 GEMMs on the tensor cores (CUDA only); bf16: mixed precision, "
                            "float32 master weights (on CUDA: not with --unfused)")
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


def _communicator_used(comm: Any, model: Any) -> str | None:
    """What summed the gradients: the communicator's name, "mpi" where shared memory does not
    hold this model (CUDA, bf16: SharedMemory falls back to MPI's all-reduce), None in one process."""
    if comm.size <= 1:
        return None
    if comm.name == "shm" and not comm.shares(model):
        return "mpi"
    return comm.name


def _dataset(args: argparse.Namespace) -> data_mod.Dataset:
    if _sharded(args):
        comm = getattr(args, "comm", None)
        if comm is None or comm.size == 1:
            raise UsageError(f"--data: {args.data!r} names a file per rank ({{rank}}): run it under mpiexec -n N")
        return data_mod.from_file(args.data.replace("{rank}", str(comm.rank)), args.label, seed=args.seed)
    if args.data in data_mod.BUILTIN:
        if args.label is not None:
            raise UsageError(f"--label: applies to .csv files, not the built-in dataset {args.data!r}")
        return data_mod.BUILTIN[args.data](seed=args.seed) if args.data != "xor" else data_mod.xor()
    return data_mod.from_file(args.data, args.label, seed=args.seed)


# What the CLI picks when an option is not given, by dataset or task: each bundled dataset
# trains with these (a test holds every one to it).
DEFAULTS = {"xor": {"hidden": [8], "lr": 4.0, "epochs": 500}, "regression": {"lr": 0.05}}
TASK_DEFAULTS = {"classification": {"lr": 2.0}, "regression": {"lr": 0.05}}
BASE_DEFAULTS = {"hidden": [64], "epochs": 30}


def _defaults(args: argparse.Namespace, task: str) -> None:
    for key in ("hidden", "lr", "epochs"):
        if getattr(args, key) is None:
            for table in (DEFAULTS.get(args.data, {}), TASK_DEFAULTS[task], BASE_DEFAULTS):
                if key in table:
                    setattr(args, key, table[key])
                    break


def _outputs(args: argparse.Namespace) -> list[str]:
    """The input file (never to be overwritten) for the output paths' checks."""
    return [] if args.data in data_mod.BUILTIN else [args.data]


CLI_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, DeviceError, FloatingPointError, MemoryError)


def _communicator(args: argparse.Namespace) -> Any:
    """This process's communicator: one rank of several when mpiexec started more than one."""
    from . import distributed

    try:
        return distributed.from_environment(args.distributed, _device_kind(args.device))
    except distributed.DistributedError as exc:
        raise UsageError(f"--distributed: {exc}") from None


def _device_kind(spec: str | None) -> str:
    spec = spec if spec is not None else os.environ.get("GPU_BACKPROP_DEVICE", "auto")
    if spec.startswith("cuda"):
        return "cuda"
    if spec == "auto":
        from .device import probe_cuda

        return "cuda" if probe_cuda()[0] else "cpu"
    return "cpu"


def cmd_train(args: argparse.Namespace) -> int:
    comm = args.comm = _communicator(args)
    if comm.size == 1:
        return _train(args, comm)
    # Every rank checks its options, data and device; they agree before any training starts, so
    # an error on one rank (a file only it cannot read) stops every rank, with rank 0 saying why.
    ds = _agreed(comm, lambda: _dataset(args))
    if _sharded(args):  # each rank read its own file: one standardisation and one set of classes
        from .distributed import shard_dataset

        ds = _agreed(comm, lambda: shard_dataset(ds, comm))
    return _train(args, comm, _agreed(comm, lambda: _prepare(args, comm, ds)))


def _agreed(comm: Any, work: Any) -> Any:
    """``work()`` on every rank; if it failed on any, every rank stops with the first error."""
    error = result = None
    try:
        result = work()
    except CLI_ERRORS as exc:
        error = " ".join(str(exc).split())
    error = comm.agree(error)
    if error is not None:
        raise UsageError(error)
    return result


def _sharded(args: argparse.Namespace) -> bool:
    """--data with {rank}: a file per rank (under mpiexec), each rank reading its own."""
    return "{rank}" in args.data


def _train(args: argparse.Namespace, comm: Any, prepared: tuple | None = None) -> int:
    ds, model, inputs = prepared if prepared is not None else _prepare(args, comm, _dataset(args))
    sharded = _sharded(args) and comm.size > 1
    lead = comm.rank == 0  # the rank that prints and writes
    if not args.json and lead:
        ranks = f", {comm.size} ranks ({comm.name})" if comm.size > 1 else ""
        print(f"{model} on {ds.name}: {len(ds.X_train)} train / {len(ds.X_test)} test samples{ranks}", file=sys.stderr)
    start = time.perf_counter()
    comm.training = True  # from here a failure on one rank ends every rank (main)
    try:
        history = _fit_named(model, ds.X_train, ds.y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            momentum=args.momentum, validation_data=(ds.X_test, ds.y_test), progress=not args.json,
                            graphs=False if args.no_graphs else None,
                            distributed=comm if comm.size > 1 else None, sharded=sharded, **_training(args))
    except FloatingPointError as exc:
        comm.training = False  # every rank saw the same reduced loss diverge: rank 0 alone reports it
        kept = getattr(exc, "epochs_kept", 0)
        if args.save is None or not kept or not lead:
            raise
        # The epochs before the divergence are a trained model: keep them.
        raise UsageError(f"{exc}; {_save(model, ds, args, inputs, f'the model after epoch {kept}')}") from None
    seconds = time.perf_counter() - start
    from .train import _evaluate

    # the test metrics over every rank's share (sharded: every rank's own test rows), on every rank
    test = _evaluate(model, (ds.X_test, ds.y_test), comm if comm.size > 1 else None, sharded)
    comm.training = False
    if not lead:
        return 0
    return _report(args, comm, ds, model, inputs, history, seconds, test)


def _prepare(args: argparse.Namespace, comm: Any, ds: data_mod.Dataset) -> tuple:
    """Options, device and model for the dataset ``ds``, all checked: (dataset, model, input files)."""
    if args.precision == "bf16" and args.unfused and _device_kind(args.device) == "cuda":
        raise UsageError("--precision: 'bf16' on CUDA runs on the fused kernels only: drop --unfused")
    # Every output path is checked before any training, so no trained model is lost to a bad one.
    inputs = _outputs(args)
    if args.save is not None:
        check_writable(args.save, "--save", inputs)
    if args.checkpoint is not None:
        check_writable(args.checkpoint, "--checkpoint", inputs)
    if args.resume is not None and not os.path.isfile(args.resume):
        raise UsageError(f"--resume: {args.resume!r} is not a file (expected a --checkpoint file)")
    if args.plot is not None:
        check_writable(args.plot, "--plot", inputs)
        if args.save is not None and os.path.realpath(args.plot) == os.path.realpath(args.save):
            raise UsageError(f"--plot: {args.plot!r} is also the --save path: expected two different files")
        _require_matplotlib()
    _defaults(args, ds.task)
    output = args.output or ("identity" if ds.task == "regression" else None)
    device = resolve_device(args.device)
    if comm.size > 1 and device.kind == "cuda":  # one GPU per rank, by its rank on the machine
        from .device import get_device
        from .distributed import local_rank

        device = get_device(f"cuda:{local_rank() % device.xp.cuda.runtime.getDeviceCount()}")
        device.xp.cuda.Device(device.index).use()  # current for every allocation of this rank
    sizes = [ds.X_train.shape[1], *args.hidden, ds.n_outputs]
    check_memory(sizes, np.dtype(args.dtype), device, batch=min(args.batch_size, len(ds.X_train)),
                 rows=len(ds.X_train), states=2 if args.optimizer != "sgd" else int(bool(args.momentum)),
                 what="--hidden")
    model = MLP(sizes, activation=args.activation, output=output,
                loss=args.loss, device=device, dtype=args.dtype, seed=args.seed, fused=not args.unfused,
                precision=args.precision)
    model.classes_ = ds.classes
    return ds, model, inputs


def _report(args: argparse.Namespace, comm: Any, ds: data_mod.Dataset, model: MLP, inputs: list[str],
            history: Any, seconds: float, test: dict) -> int:
    result = {
        "dataset": ds.name, "sizes": model.sizes, "activation": model.activation, "output": model.output,
        "loss_function": model.loss, "device": model.device.name, "device_reason": model.device.reason,
        "fused": model.ops.fused, "precision": model.precision, "graphs": bool(getattr(model.last_steps, "captured", 0)), "dtype": model.dtype.name, "epochs": history.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum, "optimizer": args.optimizer,
        "lr_last_epoch": history.lr[-1], "best_epoch": history.best_epoch, "stopped_early": history.stopped_early,
        "train_loss": history.loss[-1], "train_accuracy": history.accuracy[-1],
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "seconds": seconds, "seconds_per_epoch": float(np.median(history.seconds)),
        "gemm_paths": model.ops.gemm_paths(),  # CUDA: the tile, split or cuBLAS each layer's GEMMs ran on
        "ranks": comm.size, "distributed": _communicator_used(comm, model),
    }
    if args.save:
        message = _save(model, ds, args, inputs, "the trained model")
        if not message.startswith("saved"):
            raise UsageError(message)
        result["saved"] = args.save
    if args.plot:
        try:
            _plot(history, args.plot, [*inputs, *([args.save] if args.save else [])])
        except (OSError, ValueError) as exc:
            saved = f"; the model was saved to {args.save!r}" if args.save else ""
            raise UsageError(f"--plot: cannot write {args.plot!r}: {_why(exc)}{saved}") from None
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        accuracy = "" if test["accuracy"] is None else f"test accuracy {test['accuracy']:.4f}, "
        print(f"{accuracy}test loss {test['loss']:.4f}; {result['seconds_per_epoch'] * 1e3:.1f} ms per epoch "
              f"(median of {history.epochs}), {seconds:.2f} s in all on {model.device.name} ({model.dtype.name})")
        for key in ("saved", "plot"):
            if key in result:
                print(f"{key}: {result[key]}")
    return 0


# fit's argument names in its errors, as the options that set them
OPTION_OF = {"resume_from": "--resume", "checkpoint": "--checkpoint", "nesterov": "--nesterov",
             "weight_decay": "--weight-decay", "alpha": "--alpha", "patience": "--early-stopping", "lr": "--lr"}


def _fit_named(model: MLP, *args: Any, **kwargs: Any) -> Any:
    """model.fit, its errors naming the command's options rather than fit's arguments."""
    try:
        return model.fit(*args, **kwargs)
    except ValueError as exc:
        text = str(exc)
        for name, option in OPTION_OF.items():
            if text.startswith(name + ":") or text.startswith(name + " "):
                raise UsageError(option + text[len(name):]) from None
        raise


def _training(args: argparse.Namespace) -> dict[str, Any]:
    """MLP.fit's optimizer, schedule, stopping and checkpoint arguments from the options (checked by
    fit under their names; the CLI's one-line error names the option's words)."""
    kwargs = dict(optimizer=args.optimizer, nesterov=args.nesterov, alpha=args.alpha,
                  weight_decay=args.weight_decay, schedule=args.schedule, checkpoint=args.checkpoint,
                  resume_from=args.resume)
    if args.early_stopping is not None:
        kwargs.update(early_stopping=True, patience=args.early_stopping)
    return kwargs


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _save(model: MLP, ds: data_mod.Dataset, args: argparse.Namespace, inputs: list[str], what: str) -> str:
    """Save to --save; if that fails now (the folder went away, the disk filled), save to a
    fallback file so the trained model is not lost. Returns what happened, in words."""
    extra = {"x_mean": ds.mean, "x_scale": ds.scale}
    try:
        write_model(model, args.save, extra, "--save", inputs)
        return f"saved {what} to {args.save!r}"
    except (OSError, ValueError) as exc:
        failure = f"--save: cannot write {args.save!r}: {_why(exc)}"
    for folder in (os.getcwd(), tempfile.gettempdir()):
        fallback = None
        try:
            fd, fallback = tempfile.mkstemp(prefix="gpu-backprop-model-", suffix=".npz", dir=folder)
            os.close(fd)
            write_model(model, fallback, extra, "--save")
            return f"{failure}; {what} was saved to {fallback!r} instead"
        except (OSError, ValueError):
            if fallback is not None:  # no empty file left behind
                try:
                    os.unlink(fallback)
                except OSError:
                    pass
    return f"{failure}; no fallback file could be written either"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "gpu_backprop[plot]"') from None


def _plot(history: Any, path: str, inputs: list[str]) -> None:
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
    try:
        write_atomically(path, lambda fh: fig.savefig(fh, dpi=100, format="png"), "--plot", inputs)
    finally:
        plt.close(fig)


def cmd_predict(args: argparse.Namespace) -> int:
    model = MLP.load(args.model, device=args.device)
    X, y, columns = data_mod.read_table(args.data, args.label)
    X = np.asarray(data_mod.check_features(X, model.sizes[0], columns=columns), dtype=np.float64)
    extra = getattr(model, "extra", {})
    if "x_mean" in extra and "x_scale" in extra:  # the training set's standardisation
        with np.errstate(over="ignore", invalid="ignore"):
            X = (X - extra["x_mean"]) / extra["x_scale"]
        if not np.all(np.isfinite(X)):
            j = int(np.nonzero(~np.isfinite(X).all(axis=0))[0][0])
            name = repr(columns[j]) if columns else str(j)
            raise UsageError(f"data: column {name} of {args.data!r} is too large to standardise for this model")
    data_mod.check_range(X, model.dtype, f"data {args.data!r}", columns)  # no input the model's dtype cannot hold
    with np.errstate(over="ignore", invalid="ignore"):
        outputs = model.predict(X)
    if not np.all(np.isfinite(outputs)):
        raise UsageError(f"data: {args.data!r}: the outputs overflow {model.dtype.name} for these inputs")
    classes = model.classes_
    predictions = [classes[i] for i in outputs] if classes is not None and model.task == "classification" \
        else outputs.tolist()
    result: dict[str, Any] = {"n": len(X), "predictions": predictions}
    if y is not None:
        result.update(model.evaluate(X, _encode(y, classes, model)))
        if not np.isfinite(result["loss"]):
            raise UsageError(f"data {args.data!r}: the loss against its targets overflows {model.dtype.name} "
                             f"(outputs up to {float(np.abs(outputs).max()):.3g})")
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        for p in predictions:
            print(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in np.atleast_1d(p).tolist()))
        if y is not None and result.get("accuracy") is not None:
            print(f"accuracy {result['accuracy']:.4f} on {len(X)} samples", file=sys.stderr)
    return 0


def _encode(y: np.ndarray, classes: list | None, model: MLP) -> np.ndarray:
    """Labels as the model's class indices (through the classes it was trained on, when saved)."""
    if classes is None or model.task != "classification":
        return y
    index = {c: i for i, c in enumerate(classes)}
    if y.ndim != 1:
        raise UsageError(f"y: expected 1-D labels, got shape {y.shape}")
    out = np.empty(len(y), dtype=np.int64)
    for i, v in enumerate(y.tolist()):
        key = int(v) if isinstance(v, float) and v.is_integer() else v
        if key not in index:
            raise UsageError(f"y: label {v!r} is not one of the model's classes ({_classes(classes)})")
        out[i] = index[key]
    return out


def _classes(classes: list) -> str:
    text = ", ".join(map(repr, classes[:10]))
    return text + (", ..." if len(classes) > 10 else "")


def cmd_info(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
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


def _speaks() -> bool:
    """Whether this process reports errors: the only one, or rank 0 of those mpiexec started."""
    from .distributed import launched_rank

    return launched_rank() == 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="gpu_backprop: %(message)s")
    args = None
    try:
        args = build_parser().parse_args(argv)
        # Numerical trouble is found by explicit checks (finite inputs, losses, outputs) and
        # reported in one line; NumPy's RuntimeWarnings would only spill onto stderr.
        with np.errstate(all="ignore"):
            return {"train": cmd_train, "predict": cmd_predict, "info": cmd_info}[args.command](args)
    except CLI_ERRORS as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        comm = getattr(args, "comm", None)
        if comm is not None and comm.size > 1 and getattr(comm, "training", False):
            # a failure on this rank mid-training: say which, and end every rank (no one waits in a sum)
            print(f"gpu-backprop: error: rank {comm.rank} of {comm.size}: {message}", file=sys.stderr)
            comm.abort(EXIT_USAGE)
        if _speaks():  # under mpiexec, every rank failed alike (or agreed): rank 0 says it once
            print(f"gpu-backprop: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader (e.g. `| head`) left: nothing more to say, no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
