"""The ``act`` command: ``act search``, ``act eval``, ``act demo``, ``act inspect``.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "search": ("act_kernels.search", "find the heads to calibrate (offline head search)"),
    "eval": ("act_kernels.evaluate", "evaluate the uncalibrated model vs a profile"),
    "demo": ("act_kernels.demo", "search + evaluation on SmolLM2, small and fast"),
    "inspect": ("act_kernels.inspection.cli", "look at the attention sinks of a model"),
    "lm-eval": ("act_kernels.lmeval", "lm-evaluation-harness with the 'act' model type"),
}


def _module(command: str):
    name = SUBCOMMANDS[command][0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise SystemExit(f"act {command}: this installation has no {name} module "
                             "(the subcommand is not available)")
        raise


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The argument parser; ``commands`` limits which subcommands get their full arguments
    (the others accept anything and fail when run)."""
    parser = argparse.ArgumentParser(
        prog="act", description="ACT: attention calibration of hidden attention sinks "
                                "(Yu et al., ICML 2024)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        if commands is None or command in commands:
            try:
                _module(command).add_arguments(p)
            except SystemExit:
                if commands is not None:
                    raise
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv if a in SUBCOMMANDS][:1]
    parser = build_parser(wanted or [])
    args = parser.parse_args(argv)
    module = _module(args.command)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nact {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:
        from .tasks import DataNotInstalledError

        if isinstance(exc, (KeyError, ValueError, FileNotFoundError, DataNotInstalledError)):
            raise SystemExit(f"act {args.command}: error: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main())
