"""``results.json``: schema version, JSON cleaning, validation and loading. The schema is documented in
``SCHEMA.md`` next to this file; :data:`REQUIRED_PER_OBJECTIVE` is what every fitted objective holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from protscale.errors import UserError

SCHEMA_VERSION = 1
SCHEMA_DOC = Path(__file__).with_name("SCHEMA.md")

#: Dotted keys that every objective with a fitted IsoFLOP frontier / parametric law holds.
REQUIRED_ISOFLOP = ("n_exponent", "n_exponent_ci95", "d_exponent", "d_exponent_ci95", "n_coefficient",
                    "d_coefficient", "budgets", "dropped_budgets", "bootstrap_samples")
REQUIRED_PARAMETRIC = ("best", "basins", "allocation_exponent", "allocation_exponent_ci95", "bootstrap_samples")
REQUIRED_TOP = ("schema_version", "experiments", "config", "checks", "objectives", "allocation")

#: What the intervals rest on: coverage of the nominal 95% intervals over synthetic sweeps drawn from a known
#: law (4–6 budgets, 5–8 off-centre sizes each, 0.005–0.01 noise in loss; 4–6 transfer runs), measured by
#: ``benchmarks/calibration.py`` with the fitting code of this version. Re-measure when a method changes.
CALIBRATION = {
    "command": "benchmarks/calibration.py --sweeps 200 --first-seed 1000 --bootstrap 200 --bootstrap-parametric 50 "
               "--workers 2",
    "nominal": 0.95,
    "quantities": [
        {"quantity": "isoflop n_exponent", "observed": 0.980, "median_width": 0.109, "simulations": 200},
        {"quantity": "parametric allocation_exponent", "observed": 0.980, "median_width": 0.086, "simulations": 200},
        {"quantity": "transfer a", "observed": 0.975, "median_width": 0.246, "simulations": 200},
        {"quantity": "transfer b", "observed": 0.960, "median_width": 0.212, "simulations": 200},
    ],
}


def clean_json(obj):
    """numpy → Python, NaN/inf → None, recursively."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def validate(results: dict) -> list[str]:
    """Problems with a results dict (empty list when it follows the schema)."""
    errs = [f"missing top-level key {k!r}" for k in REQUIRED_TOP if k not in results]
    if results.get("schema_version") != SCHEMA_VERSION:
        errs.append(f"schema_version {results.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for obj, r in (results.get("objectives") or {}).items():
        for part, keys in (("isoflop", REQUIRED_ISOFLOP), ("parametric", REQUIRED_PARAMETRIC)):
            sec = r.get(part)
            if not isinstance(sec, dict):
                errs.append(f"objectives.{obj}.{part} missing")
                continue
            if sec.get("status") == "skipped":
                if not sec.get("reason"):
                    errs.append(f"objectives.{obj}.{part} skipped without a reason")
                continue
            errs += [f"objectives.{obj}.{part}.{k} missing" for k in keys if k not in sec]
        for k in ("envelope", "transfer", "allocation"):
            if k not in r:
                errs.append(f"objectives.{obj}.{k} missing")
    return errs


def write_results(results: dict, path: Path) -> None:
    path.write_text(json.dumps(clean_json(results), indent=1, allow_nan=False) + "\n")


def load_results(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such results file (run `protscale fit` first)")
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{p}: not a readable results.json ({exc})") from None
    if not isinstance(res, dict) or "schema_version" not in res:
        raise UserError(f"{p}: not a protscale results.json (no schema_version)")
    if res["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{p}: schema_version {res['schema_version']} is not supported (this version reads "
                        f"{SCHEMA_VERSION}); fit again")
    return res
