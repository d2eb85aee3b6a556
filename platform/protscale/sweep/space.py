"""Search spaces: sweeps written in Python (``search_spaces/*.py`` define ``SPACE``).

    from protscale.sweep.space import SearchSpace, isoflop_grid, transfer_grid

    SPACE = SearchSpace(
        name="my-isoflop",                                  # MLflow experiment (one per sweep)
        data=".demo/data",                                  # a prepared dataset directory
        trials=isoflop_grid(budgets=[1e18, 3e18], sizes=["85M", "170M"], objectives=["clm"]),
    )

A trial is (objective, size, budget_flops, seed) plus an optional CLM parent for transfer; the paper's
peak-LR and batch rule by size applies unless a trial overrides it (its name then says so: an LR or
batch sweep has one trial name per value). The space's ``defaults`` are ``TrialConfig`` fields
(``train/config.py``), checked by name. What a trial *is* — for skip-if-done and ``--resume`` — is its
``trial_hash`` (every setting that changes its result), not its name: edit the space, and exactly the
trials whose identity changed train again.
"""

from __future__ import annotations

import json
import os
import runpy
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError
from ..model.sizes import SIZES, get_size, tokens_for_budget


@dataclass(frozen=True)
class Trial:
    objective: str
    size: str
    budget_flops: float
    seed: int = 0
    parent: str = ""                 # name of the CLM trial a transfer MLM starts from
    batch_tokens: int = 0            # 0: the paper's rule by size (or the space's default)
    lr_max: float = 0.0

    @property
    def name(self) -> str:
        from ..train.config import trial_name

        return trial_name(self.objective, self.size, self.budget_flops, self.seed, self.lr_max,
                          self.batch_tokens, self.parent)


@dataclass
class SearchSpace:
    name: str
    data: str
    trials: list[Trial]
    defaults: dict = field(default_factory=dict)     # TrialConfig fields for every trial (eval_every...)
    max_concurrent: int = 0                          # 0: as many as the cluster's resources allow
    gpus_per_trial: float = 0                        # 0: CPU trials (1 CPU each); <1: a share of one GPU
    gpu_memory_gb: float = 80.0                      # memory of one GPU: the memory plan fits it (--gpu-memory)
    max_workers: int = 8                             # GPUs one trial may use (the plan takes the fewest that fit)
    source: str = ""                                 # the file it was loaded from
    adaptive: object = None                          # an ``adaptive.Adaptive``: waves placed after the trials


def all_trials(space: SearchSpace) -> list[Trial]:
    """The space's trials, then every trial its adaptive design may add (the candidate grid)."""
    extra = space.adaptive.grid() if space.adaptive is not None else []
    return list(dict.fromkeys([*space.trials, *extra]))


def isoflop_grid(budgets, sizes, objectives=("clm",), seed: int = 0, **overrides) -> list[Trial]:
    """Every (objective, budget, size): an IsoFLOP profile per budget."""
    return [Trial(o, s, float(c), seed, **overrides) for o in objectives for c in budgets for s in sizes]


def transfer_grid(sizes, clm_budgets, mlm_budgets, seed: int = 0, **overrides) -> list[Trial]:
    """CLM→MLM transfer: CLM parents, MLMs initialised from each, and scratch MLM baselines."""
    clm = [Trial("clm", s, float(c), seed, **overrides) for s in sizes for c in clm_budgets]
    out = list(clm)
    for parent in clm:
        out += [Trial("mlm", parent.size, float(m), seed, parent=parent.name, **overrides) for m in mlm_budgets]
    out += [Trial("mlm", s, float(m), seed, **overrides) for s in sizes for m in mlm_budgets]
    return list(dict.fromkeys(out))


def load(path: str | Path) -> SearchSpace:
    """Run a search-space file and return its ``SPACE``. A file that is missing, does not run (syntax
    error, an import or any exception) or defines no ``SPACE`` raises ``SpaceError`` naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such search-space file (see search_spaces/)")
    try:
        space = runpy.run_path(str(path)).get("SPACE")
    except SyntaxError as exc:
        raise SpaceError(f"{exc.filename or path}:{exc.lineno}: syntax error: {exc.msg}; fix the "
                         "search-space file") from None
    except (Exception, SystemExit) as exc:
        raise SpaceError(f"{_where(exc, path)}: the search-space file raised {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; fix it (it must define SPACE = "
                         "SearchSpace(...))") from None
    if not isinstance(space, SearchSpace):
        raise SpaceError(f"{path}: defines no SPACE = SearchSpace(...)")
    # $PROTSCALE_DATA replaces the space's data (a RayJob points a space at the cluster's object store).
    space.data = os.environ.get("PROTSCALE_DATA") or space.data
    if "://" not in space.data and not Path(space.data).is_absolute():  # URIs (s3://, gs://) stay as given
        space.data = str((Path.cwd() / space.data).resolve())
    return replace(space, source=str(path))


class SpaceError(UserError, ValueError):
    """A search-space file that cannot be used (message: file, line, what to do)."""


def _where(exc: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame of ``exc`` inside the search-space file (else the file)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def validate(space: SearchSpace, manifest: dict | None) -> list[str]:
    """Problems that would waste a sweep, each as a message naming the trial and what to change."""
    from ..train.config import field_names

    errors: list[str] = []
    if not isinstance(space.trials, (list, tuple)) or not all(isinstance(t, Trial) for t in space.trials):
        return [f"SPACE.trials must be a list of Trial(...), not {type(space.trials).__name__}"]
    if not space.trials:
        errors.append("SPACE.trials is empty: nothing to run")
    if not isinstance(space.defaults, dict):
        return [f"SPACE.defaults must be a dict of TrialConfig fields, not {type(space.defaults).__name__}"]
    unknown = sorted(set(space.defaults) - field_names())
    if unknown:
        errors.append(f"SPACE.defaults: unknown TrialConfig field(s) {', '.join(unknown)} "
                      f"(known: {', '.join(sorted(field_names()))})")
    if space.adaptive is not None:
        from .adaptive import Adaptive

        if not isinstance(space.adaptive, Adaptive):
            return [f"SPACE.adaptive must be an Adaptive(...), not {type(space.adaptive).__name__}"]
        errors += space.adaptive.problems()
        if errors:
            return errors
    names = [t.name for t in space.trials]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"trial {dup}: listed {names.count(dup)} times")
    by_name = {t.name: t for t in space.trials}
    seq_len = (manifest or {}).get("seq_len", 1024)
    unique_tokens = ((manifest or {}).get("splits", {}).get("train", {}) or {}).get("tokens")
    for t in all_trials(space):          # adaptive: every trial placement may choose must be valid
        if t.size not in SIZES:
            errors.append(f"trial {t.name}: unknown size {t.size!r} (known: {', '.join(SIZES)})")
            continue
        if t.objective not in ("clm", "mlm"):
            errors.append(f"trial {t.name}: objective must be clm or mlm")
            continue
        bad = [f"{k}={getattr(t, k)!r}" for k in ("budget_flops", "lr_max", "batch_tokens", "seed")
               if not isinstance(getattr(t, k), (int, float)) or not 0 <= getattr(t, k) < float("inf")]
        if bad or not t.budget_flops:
            errors.append(f"trial {t.name}: {', '.join(bad) or 'budget_flops=0'}: needs finite numbers, "
                          "budget_flops > 0, lr_max/batch_tokens/seed >= 0")
            continue
        size = get_size(t.size)
        from ..train.recipe import batch_tokens as rule

        batch = t.batch_tokens or space.defaults.get("batch_tokens") or rule(size, seq_len)
        tokens = tokens_for_budget(size, t.budget_flops)
        if tokens < batch:
            errors.append(f"trial {t.name}: budget {t.budget_flops:.3g} FLOPs buys {tokens:,} tokens, less "
                          f"than one optimizer step of {batch:,}; raise the budget or use a smaller size/batch")
        if unique_tokens and tokens > unique_tokens:
            errors.append(f"trial {t.name}: {tokens:,} tokens is {tokens / unique_tokens:.1f} epochs of the "
                          f"{unique_tokens:,} unique training tokens; the paper's laws assume no repetition — "
                          "add data or lower the budget")
        if t.parent and (t.parent not in by_name or by_name[t.parent].objective != "clm"):
            errors.append(f"trial {t.name}: parent {t.parent!r} is not a CLM trial of this space")
        if space.gpus_per_trial and t.objective in ("clm", "mlm"):
            from ..train.memory import DoesNotFit

            try:
                plan(space, t, seq_len)
            except DoesNotFit as exc:
                errors.append(str(exc))
    return errors


def gpu_memory_gb(space: SearchSpace) -> float:
    """GPU memory one trial may use: the space's GPU, or its share of one (gpus_per_trial < 1); 0 on CPU."""
    return space.gpu_memory_gb * min(1.0, space.gpus_per_trial) if space.gpus_per_trial else 0.0


def seq_len(space: SearchSpace) -> int:
    """Row length of the space's prepared data (its manifest), 1024 (the paper's) before it is prepared."""
    manifest = Path(space.data) / "manifest.json"
    return int(json.loads(manifest.read_text())["seq_len"]) if manifest.is_file() else 1024


def plan(space: SearchSpace, trial: Trial, seq_len_: int | None = None):
    """The trial's ``Plan`` — the same object its workers build (``train/plan.py``). GPU trials get the
    fastest memory plan on up to ``max_workers`` GPUs (one when they share a GPU); raises
    ``memory.DoesNotFit`` naming the trial when none fits."""
    from ..train.plan import Plan
    from .tune import trial_config

    cfg = trial_config(space, trial, tracking_uri="")
    rows = seq_len_ or seq_len(space)
    if not cfg.gpu_memory_gb:
        return Plan(cfg, rows, 1)
    return Plan.for_gpus(cfg, rows, space.max_workers if space.gpus_per_trial >= 1 else 1)


def workers(space: SearchSpace, trial: Trial) -> int:
    """Ray Train workers of a trial: 0 (Train's local mode, in the Tune trial's own process) for CPU
    trials and GPU trials whose plan needs one GPU; the plan's GPU count above that, one worker each."""
    if not space.gpus_per_trial:
        return 0
    world = plan(space, trial).world
    return 0 if world == 1 else world


def resources(space: SearchSpace, trial: Trial) -> dict:
    """What the Tune trial itself holds. In local mode it runs the training loop, so it holds the CPU or
    (a share of) the GPU; with a worker group, the workers ask Ray for their GPUs themselves."""
    if not space.gpus_per_trial:
        return {"cpu": 1}
    if workers(space, trial):
        return {"cpu": 1, "workers": workers(space, trial), "gpu_per_worker": 1}
    return {"cpu": 1, "gpu": space.gpus_per_trial}


def trial_hashes(space: SearchSpace, tracking_uri: str = "", trials: list[Trial] | None = None,
                 known: dict[str, str] | None = None) -> dict[str, str]:
    """{trial name: trial_hash} of every trial of the space (its adaptive candidates included), or of
    ``trials`` only (``known``: hashes of their possible parents) (``TrialConfig.identity_hash``): a
    transfer trial's includes its CLM parent's. Needs the space's prepared data (its manifest)."""
    from ..data.shards import read_manifest
    from .tune import trial_config

    manifest = read_manifest(space.data)
    out: dict[str, str] = dict(known or {})
    for t in sorted(all_trials(space) if trials is None else trials, key=lambda t: bool(t.parent)):  # parents first
        out[t.name] = trial_config(space, t, tracking_uri).identity_hash(manifest, out.get(t.parent, ""))
    return out
