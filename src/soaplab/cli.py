"""The ``soaplab`` command: argparse subcommands only; each parses and calls one function."""

from __future__ import annotations

import argparse
import sys

import torch

from soaplab.analysis.commands import register as register_analysis
from soaplab.experiments.commands import register as register_experiments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soaplab", description="SOAP/Shampoo experiments and analyses."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register_experiments(sub)
    register_analysis(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Denormal floats slow CPU matmuls and QR by large factors on this kind of machine; the
    # optimizers' statistics decay towards them (EMAs of squared gradients).
    torch.set_flush_denormal(True)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"soaplab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
