"""The `cryoflex` command: one subcommand per module in this package; each module's docstring is its help."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cryoflex import __version__
from cryoflex.errors import CryoflexError, CryoflexInputError
from cryoflex.run_dir import RunDir

# The --device help of every command that computes.
DEVICE_HELP = "auto (default: the GPU when there is one), cpu, cuda or cuda:N"
# The --threads help of every command that computes (cryoflex.threads).
THREADS_HELP = (
    "CPU threads: 0 (default) = automatic: the CPUs this process may use (affinity and cgroup quota), and while it "
    "runs the count that measures fastest, so other jobs on the machine do not slow it down many times; N = exactly N"
)


def check_output_directory(out: Path | None) -> None:
    """Refuse an --out that names an existing file, or lies under one: every command writes a directory there."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise CryoflexInputError(
            out, "this is a file, and the command writes a directory here",
            "pass --out a directory: a new one, or one this command wrote before", field="--out",
        )  # fmt: skip
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CryoflexInputError(
            out, f"{parent} is a file, so no directory can be made under it",
            "pass --out a directory: a new one, or one this command wrote before", field="--out",
        )  # fmt: skip


def check_datadir(datadir: str | Path | None) -> None:
    """Refuse a --datadir that is not a folder (every command that takes one looks for the stacks there)."""
    if datadir is not None and not Path(datadir).is_dir():
        raise CryoflexInputError(datadir, "not a folder", "give the folder that holds the particle stacks",
                                 field="--datadir")  # fmt: skip


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads for the commands that compute without a training loop: a fixed count (no timing)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads: 0 (default) = the CPUs this process may use (affinity and cgroup quota); "
                             "N = exactly N (on a machine shared with other jobs, 1 avoids threads waiting on them)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from --threads (imports torch: call it in run(), not at parse time)."""
    from cryoflex.threads import set_threads

    if args.threads < 0:
        raise CryoflexInputError(None, f"--threads {args.threads}", fix="give 0 (automatic) or a number of threads",
                                 field="--threads")  # fmt: skip
    set_threads(args.threads)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Which run state analyze, eval and reconstruct load: --checkpoint best|last or --epoch N, and --datadir."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", choices=("best", "last"),
                       help="last: the newest (default); best: the epoch with the best validation score")
    which.add_argument("--epoch", type=int, help="the checkpoint after this epoch")
    parser.add_argument("--datadir", type=Path,
                        help="the folder that holds the particle stacks now, if they moved since training")  # fmt: skip


# Subcommand name -> module under cryoflex.cli. Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, str] = {
    "info": "cryoflex.cli.info",
    "simulate": "cryoflex.cli.simulate",
    "train": "cryoflex.cli.train",
    "analyze": "cryoflex.cli.analyze",
    "eval": "cryoflex.cli.eval",
    "reconstruct": "cryoflex.cli.reconstruct",
    "demo": "cryoflex.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subparser per subcommand module."""
    parser = argparse.ArgumentParser(
        prog="cryoflex",
        description="cryoflex: segments and rigid motions from cryo-EM particle images (cryoSPHERE).",
    )
    parser.add_argument("--version", action="version", version=f"cryoflex {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        sub = subparsers.add_parser(
            name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show debug messages and full tracebacks")  # also after the subcommand  # fmt: skip
        sub.set_defaults(run=module.run, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors end with a message and exit code 2 (1 for an output that cannot
    be written), not a traceback."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the subcommand's usage, which lists the options it has
        (getattr(args, "subparser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 1
    # SIGTERM (scancel, kill) stops like Ctrl-C; not under torchrun, which stops every rank with it when one fails, and
    # not outside the main thread, where handlers cannot be set
    handle_sigterm = threading.current_thread() is threading.main_thread() and "LOCAL_RANK" not in os.environ
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if handle_sigterm else None
    try:
        check_datadir(getattr(args, "datadir", None))
        return int(args.run(args) or 0)
    except CryoflexError as error:
        if args.verbose:
            raise
        print(f"cryoflex {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, CryoflexInputError) else 1
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"cryoflex {args.command}: {'terminated' if terminated else 'interrupted'}{_resume_hint(args)}",
              file=sys.stderr)  # fmt: skip
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the command as Ctrl-C does: checkpoints already written stay, the rest is not written."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # once: a second SIGTERM during the clean-up ends the process
    raise Terminated


def _resume_hint(args: argparse.Namespace) -> str:
    """For an interrupted train: the newest epoch checkpoint kept and the command that goes on from it."""
    if args.command != "train" or getattr(args, "out", None) is None:
        return ""
    epochs = RunDir(args.out).epoch_checkpoints()
    if not epochs:
        return f"; no epoch was finished in {args.out}, so start again: the same command without --resume"
    last_epoch = int(epochs[-1].stem.removeprefix("epoch_"))
    return (f"; {args.out} keeps its checkpoints up to epoch {last_epoch}. To go on: "
            f"cryoflex train --out {args.out} --resume")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
