"""``protscale data prepare``: FASTA(.gz) sources -> packed Parquet shards + manifest."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  protscale data prepare --demo --out data/demo
  protscale data prepare --source uniref50.fasta.gz:3 --source metagenomic.fa.gz:1 \\
      --ood holdout.fasta --out data/mix --seq-len 1024 --seed 0
  protscale data prepare --source a.fasta --ood-clusters 0.05 --min-seq-id 0.5 --out data/a   # needs mmseqs
  AWS_ENDPOINT_URL=http://localhost:9000 protscale data prepare --demo --out s3://datasets/demo-128 \\
      --seq-len 128 --address auto            # on a running Ray cluster, into MinIO / S3
"""


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="prepare protein data (FASTA -> packed Parquet shards)",
                          description="Protein data: FASTA(.gz) in, packed Parquet shards plus a manifest out.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser(
        "prepare", help="validate, de-duplicate, mix, split, tokenise and pack FASTA sources",
        description="Validate, de-duplicate (exactly, across sources), mix by weight, split into train / "
        "IID validation / OOD test, tokenise (ESM-2 alphabet) and pack FASTA or FASTA.gz sources into "
        "Parquet shards plus manifest.json, as a Ray Data pipeline (a local Ray, or a cluster with "
        "--address). Paths may be URIs (s3://, gs://; AWS_ENDPOINT_URL selects an S3-compatible "
        "server). manifest.json is written last: without it there is no dataset.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a FASTA or FASTA.gz file or URI (gzip detected from its bytes) and its mixing weight "
                   "(default 1): its share of the training residues. Repeat for several sources.")
    p.add_argument("--demo", action="store_true",
                   help="use the bundled UniProt sample (9,000 sequences, ~3M residues) as the source (and "
                   "its OOD file as --ood unless --ood or --ood-clusters is given)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory or URI, e.g. s3://datasets/uniref50-1024 (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is a prepared dataset")
    ood = p.add_mutually_exclusive_group()
    ood.add_argument("--ood", metavar="FILE",
                     help="separate FASTA source for the OOD test split (de-duplicated against the sources)")
    ood.add_argument("--ood-clusters", type=float, metavar="FRACTION",
                     help="hold out whole sequence-identity clusters with this fraction of the residues "
                     "as the OOD test split (needs mmseqs on PATH)")
    p.add_argument("--min-seq-id", type=float, default=0.5,
                   help="sequence identity for --ood-clusters clustering (default 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of the mixed sequences held out as IID validation (default 0.01)")
    p.add_argument("--val-min", type=int, default=100,
                   help="at least this many validation sequences, as long as 90%% stay for training "
                   "(default 100)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed for mixing and splitting (default 0)")
    p.add_argument("--on-invalid", choices=("error", "skip"), default="error",
                   help="invalid record (bad character, empty sequence, malformed header): stop with "
                   "an error (default) or drop it, count it in the manifest and report the first few")
    p.add_argument("--rows-per-shard", type=int, default=8192,
                   help="packed rows per train shard (sets the hash buckets, hence memory per task; "
                   "default 8192)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from ..errors import UserError
    from . import bundled
    from .prepare import parse_source, prepare, summary_line

    sources = [parse_source(s) for s in args.source]
    ood = args.ood
    if args.demo:
        sources = [parse_source(f"{path}:{weight:g}") for path, weight in bundled.DEMO_SOURCES] + sources
        if ood is None and args.ood_clusters is None:
            ood = str(bundled.OOD)
    if not sources:
        raise UserError("give at least one --source PATH[:WEIGHT] (or --demo)")
    manifest = prepare(sources, args.out, ood=ood, ood_clusters=args.ood_clusters,
                       min_seq_id=args.min_seq_id, val_fraction=args.val_fraction, val_min=args.val_min,
                       seq_len=args.seq_len, seed=args.seed, on_invalid=args.on_invalid,
                       overwrite=args.overwrite, progress=not args.quiet, rows_per_shard=args.rows_per_shard,
                       address=args.address)
    print(summary_line(manifest, args.out))
    return 0
