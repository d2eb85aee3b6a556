"""Sub-commands of the tracking stage: ``protscale import tb-csv``.

Heavy imports (mlflow, numpy) stay inside the handlers so that ``protscale --help`` is instant.
"""

from __future__ import annotations

import argparse

SKIPPED_CODES = ("parse_error", "unknown_axis", "unknown_objective", "unknown_size")


def add_commands(sub) -> None:
    imp = sub.add_parser("import", help="import curves logged elsewhere into the MLflow tracking store",
                         description="Import curves logged elsewhere into the MLflow tracking store.")
    kinds = imp.add_subparsers(dest="import_kind", metavar="KIND", required=True)
    tb = kinds.add_parser(
        "tb-csv", help="TensorBoard CSV exports (Wall time,Step,Value), e.g. the paper's released logs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn TensorBoard CSV exports ('Wall time,Step,Value') into MLflow runs that follow the "
        "tracking contract: objective, model size, budget and x-axis are inferred from folder and file "
        "names; tokens = compute / (6·N) where the x-axis is compute, FLOPs = 6·N·tokens where it is "
        "tokens. Defects (duplicated curves, an x-axis inconsistent with 6·N·tokens, perplexities named "
        "as losses, non-ASCII names, unreadable files) are reported, not fitted blindly. Importing the "
        "same directory again skips the curves already imported.",
        epilog="exit status: 0 when every file was imported or already there, 1 when some file could not "
        "be read or interpreted (listed with file:line), 2 on a usage error.\n"
        "example:\n  protscale import tb-csv ../shared/data/reference-logs/gpt_valid --experiment paper-clm")
    tb.add_argument("directory", metavar="DIR", help="folder searched recursively for *.csv exports")
    tb.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment (created if needed)")
    tb.add_argument("--tracking-uri", metavar="URI",
                    help="MLflow tracking URI or SQLite file (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    tb.add_argument("--size-map", metavar="FILE.json",
                    help='JSON {"label": N, ...} added to / overriding the default size table '
                    "(labels like 85M or 1.2B, N = non-embedding parameters)")
    tb.add_argument("--sweep", metavar="NAME", help="sweep tag of the imported runs (default: the experiment)")
    tb.add_argument("--seq-len", type=int, default=1024, metavar="N",
                    help="sequence length: tokens per sample for 'vs samples' exports (default 1024)")
    tb.add_argument("--dry-run", action="store_true", help="parse and report; write nothing")
    tb.add_argument("-v", "--verbose", action="store_true", help="also list the notes (inferences made)")
    tb.set_defaults(func=_import_tb_csv)


def _import_tb_csv(args) -> int:
    from pathlib import Path

    from protscale.errors import UserError

    from . import contract
    from .import_tb import import_tb_csv, load_size_map

    root = Path(args.directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if args.seq_len <= 0:
        raise UserError("--seq-len must be positive")
    sizes = load_size_map(args.size_map)
    uri = contract.resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else contract.default_tracking_uri()
    from .auth import check_tracking_access

    check_tracking_access(uri)
    summary = import_tb_csv(root, args.experiment, tracking_uri=uri, size_map=sizes, sweep=args.sweep,
                            seq_len=args.seq_len, dry_run=args.dry_run, verbose=args.verbose,
                            out=lambda line: print(line, flush=True))
    return 1 if any(f.code in SKIPPED_CODES for f in summary.findings) else 0
