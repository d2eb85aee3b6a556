"""The ``protscale`` command. Each stage registers its own sub-commands from ``<stage>/cli.py``.

Heavy imports (torch, ray, mlflow) happen inside the handlers, so ``protscale --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Defined in the library (``protscale.errors``): under ``python -m protscale.cli`` this module is
# ``__main__``, and a class defined here would not be the one the library raises.
from protscale.errors import UserError  # noqa: F401  (re-exported)

# Stage modules, in data-flow order; each has ``add_commands(subparsers)``.
STAGES = (
    "protscale.data.cli",
    "protscale.tracking.cli",
    "protscale.train.cli",
    "protscale.model.cli",
    "protscale.sweep.cli",
    "protscale.analysis.cli",
    "protscale.cluster.cli",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the flag, what is wrong, where the help is), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="protscale",
        description="Compute-optimal protein language models: prepare data, train trials and sweeps "
        "(Ray Tune + Ray Train/DeepSpeed), track them in MLflow, fit scaling laws, plan budgets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow's usage telemetry sets and unsets an environment variable from its own thread; a thread that
    # copies os.environ meanwhile (every HTTP request does) dies with KeyError('_MLFLOW_TELEMETRY_SESSION_ID'):
    # seen killing a sweep driver in tests/test_chaos.py. Off unless the user turns it on.
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"protscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:        # `protscale ... | head`
        return 0
    except KeyboardInterrupt:
        print(f"protscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
