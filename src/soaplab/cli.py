"""The ``soaplab`` command: argparse subcommands only; each parses and calls one function."""

from __future__ import annotations

import argparse
import signal
import sys

import torch

import soaplab
from soaplab.analysis.commands import register as register_analysis
from soaplab.experiments.commands import register as register_experiments
from soaplab.reporting import lock


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soaplab", description="SOAP/Shampoo experiments and analyses.")
    parser.add_argument("--version", action="version",
                        version=f"soaplab {soaplab.__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    register_experiments(sub)
    register_analysis(sub)
    return parser


class Terminated(Exception):
    """SIGTERM (``kill``, a job scheduler's stop), raised in the main thread."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and exit code 2, Ctrl-C exit 130,
    SIGTERM 143 (each with how to continue). The run folders it locked are released."""
    args = build_parser().parse_args(argv)
    # Denormal floats slow CPU matmuls and QR by large factors on this kind of machine; the
    # optimizers' statistics decay towards them (EMAs of squared gradients).
    torch.set_flush_denormal(True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"soaplab: interrupted; {args.interrupted}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"soaplab: terminated; {args.interrupted}", file=sys.stderr)
        return 143
    except OSError as err:  # a file or folder the user named: missing, unwritable, ...
        where = f": {err.filename}" if err.filename else ""
        print(f"soaplab: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        lines = str(err).splitlines() or [type(err).__name__]
        print(f"soaplab: error: {lines[0]}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release_all()


if __name__ == "__main__":
    raise SystemExit(main())
