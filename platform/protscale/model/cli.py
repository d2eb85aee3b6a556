"""``protscale export`` (a trial's model to Hugging Face ``transformers``) and ``protscale register`` (a
sweep's compute-optimal model in the MLflow model registry)."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    e = sub.add_parser("export", help="export a trial's model to Hugging Face transformers",
                       description="Write the final model of a trial run as a Hugging Face transformers "
                       "model plus tokenizer: an MLM as EsmForMaskedLM (ESM-2), a CLM as GPTNeoXForCausalLM, "
                       "both with an EsmTokenizer. Load it with transformers' from_pretrained(DIR).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a completed trial")
    e.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write")
    e.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    e.set_defaults(func=export_cmd)

    r = sub.add_parser("register", help="register a sweep's compute-optimal model in the MLflow model registry",
                       description="Register, as a new version of NAME, the model of the sweep's trial with the "
                       "lowest val_loss at the largest compute budget (for one objective). The version is "
                       "tagged with the trial's size, budget and val_loss.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--experiment", required=True, help="the sweep's MLflow experiment (its search space's name)")
    r.add_argument("--objective", choices=("clm", "mlm"), required=True)
    r.add_argument("--name", default=None, help="registered model name (default: <experiment>-<objective>)")
    r.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    r.set_defaults(func=register_cmd)


def _uri(args) -> str:
    from ..tracking.auth import check_existing_store
    from ..tracking.contract import default_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    check_existing_store(uri)       # missing, corrupt or unreachable store: one line, nothing created
    return uri


def export_cmd(args) -> int:
    from ..errors import UserError

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("export needs the transformers package: pip install 'protscale[export]'") from None
    from .export import export_run

    path, cls = export_run(_uri(args), args.run_id, args.out)
    print(f"exported run {args.run_id} as {cls} + EsmTokenizer -> {path}\n"
          f"load it: transformers.AutoModel{'ForCausalLM' if 'Causal' in cls else 'ForMaskedLM'}"
          f".from_pretrained({str(path)!r}), transformers.AutoTokenizer.from_pretrained({str(path)!r})")
    return 0


def register_cmd(args) -> int:
    from ..tracking.models import register_compute_optimal

    name = args.name or f"{args.experiment}-{args.objective}"
    run, version = register_compute_optimal(_uri(args), args.experiment, args.objective, name)
    p = run.data.params
    print(f"registered {name} version {version.version}: trial {run.info.run_name} (run {run.info.run_id}), "
          f"size {p['size']}, budget {float(p['budget_flops']):.3g} FLOPs, val_loss "
          f"{run.data.metrics['val_loss']:.4f} (lowest val_loss at the sweep's largest budget)\n"
          f"load it: mlflow.pytorch.load_model('models:/{name}/{version.version}')")
    return 0
