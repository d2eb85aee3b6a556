"""TensorBoard CSV exports: which files hold the same curve, and the run each curve becomes (no MLflow).

Step 2 of ``protscale import tb-csv`` (after ``tb_parse``; then ``import_tb`` writes the runs).

Curves, not files, become runs. Files are grouped when they hold the same curve -- byte-identical copies
(imported once, every other copy reported as a defect and listed in the run's ``import_files`` tag), or
the same (wall time, value) sequence exported against another x-axis (merged into one run: tokens come
from the tokens/samples export, FLOPs from the compute export, and FLOPs/(6·tokens) is checked against
N). Where only one axis exists: compute axis -> tokens = FLOPs / (6·N); tokens -> FLOPs = 6·N·tokens;
samples -> tokens = samples·seq_len.

Defects reported (and written to the run's ``defects`` tag), never silently fitted:
``duplicate`` (byte-identical curve under another path; ``duplicate_size_conflict`` when the copies sit
in different size folders), ``axis_inconsistent`` (FLOPs/(6·tokens) disagrees with N by > 3%),
``budget_mismatch`` (the curve ends more than 10% away from the budget in its name: stopped early, or N
wrong), ``perplexity`` (a ``ppl`` export that holds perplexities: logged as ln(value)),
``value_range`` (a loss above 10 nats), ``x_not_increasing``, ``non_finite``, ``non_ascii`` (a path
with non-ASCII characters), ``parse_error`` (file:line), ``unknown_objective|size|axis`` (file skipped).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from protscale.errors import UserError

from . import contract as c
from .tb_parse import DEFAULT_SIZE_MAP, Export, Finding, parse_export, size_value

AXIS_TOL = 0.03           # FLOPs/(6·tokens) vs N
BUDGET_TOL = 0.10         # curve end vs budget in the name
NEAREST_TOL = 0.25        # a size label not in the map takes the nearest size within this ratio
PPL_MEDIAN = 4.5          # a "ppl" export whose median is above this holds perplexities
MAX_LOSS = 10.0           # a loss (nats) above this is reported
TWIN_WALL_S = 1.0         # same curve: wall times within this many seconds ...
TWIN_REL = 1e-5           # ... and values within this relative difference (after ln of perplexities)


# --- the plan: curves grouped into runs ------------------------------------------------------------------
@dataclass
class PlannedRun:
    files: list[Export]              # canonical first
    objective: str
    size: str
    n: float
    budget: float
    tokens_target: float
    metric: str
    steps: np.ndarray
    timestamps: np.ndarray
    value: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    seq_len: int
    size_source: str
    budget_source: str
    init_objective: str | None
    init_budget: float | None
    lr: float | None
    defects: list[str] = field(default_factory=list)

    @property
    def canonical(self) -> Export:
        return self.files[0]

    @property
    def rel(self) -> str:
        return self.canonical.rel

    @property
    def run_name(self) -> str:
        name = self.canonical.label
        return name if self.metric == c.VAL_LOSS else f"{name} [{self.metric}]"


@dataclass
class Plan:
    root: Path
    runs: list[PlannedRun]
    findings: list[Finding]
    n_files: int
    aliases: dict[str, str]

    @property
    def defects(self) -> list[Finding]:
        return [f for f in self.findings if f.defect]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if not f.defect]


def _same_curve(a: Export, b: Export) -> bool:
    if len(a.value) != len(b.value):
        return False
    if np.max(np.abs(a.wall - b.wall)) > TWIN_WALL_S:
        return False
    va, vb = a.value, b.value
    both_nan = np.isnan(va) & np.isnan(vb)
    close = np.abs(va - vb) <= TWIN_REL * np.maximum(1.0, np.abs(vb))
    return bool(np.all(close | both_nan))


def _nearest(sizes: dict[str, int], n: float, tol: float) -> str | None:
    best = min(sizes, key=lambda k: abs(math.log(sizes[k] / n)))
    return best if abs(math.log(sizes[best] / n)) <= math.log1p(tol) else None


def scan(root: str | Path, size_map: dict[str, int] | None = None, seq_len: int = 1024,
         progress: Callable[[str], None] | None = None) -> Plan:
    """Parse every ``*.csv`` under ``root`` and plan one run per distinct curve (no MLflow access)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    sizes = dict(size_map or DEFAULT_SIZE_MAP)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".csv")
    if not paths:
        raise UserError(f"{root}: no .csv files found")
    findings: list[Finding] = []
    exports: list[Export] = []
    for p in paths:
        e = parse_export(p, root, seq_len, findings)
        if e is not None:
            exports.append(e)
    if progress:
        progress(f"parsed {len(exports)} of {len(paths)} CSV files under {root}")

    # Non-ASCII path components, once per component.
    seen_components: dict[str, int] = Counter()
    for p in paths:
        for part in p.relative_to(root).parts:
            if not part.isascii():
                seen_components[part] += 1
    for part, count in seen_components.items():
        bad = "".join(ch for ch in part if not ch.isascii())
        names = ", ".join(unicodedata.name(ch, "?") for ch in dict.fromkeys(bad))
        findings.append(Finding("non_ascii", part, f"non-ASCII name ({bad!r}: {names}) in {count} path(s)"))

    # Perplexity exports, loss range, monotone x.
    for e in exports:
        finite = e.value[np.isfinite(e.value)]
        med = float(np.median(finite)) if finite.size else float("nan")
        if e.ppl and med > PPL_MEDIAN and np.all(finite > 0):
            findings.append(Finding("perplexity", e.rel, f"named 'ppl' and holds perplexities (range "
                                    f"{finite.min():.3g}-{finite.max():.3g}): logged ln(value) as the loss"))
            e.value = np.log(e.value)
            e.ppl_converted = True
        elif e.ppl:
            findings.append(Finding("ppl_name", e.rel, f"named 'ppl' but holds a loss (median {med:.3g}): "
                                    "logged as is", defect=False))
        finite = e.value[np.isfinite(e.value)]
        if finite.size and finite.max() > MAX_LOSS:
            i = int(np.nanargmax(e.value))
            findings.append(Finding("value_range", e.rel, f"loss {e.value[i]:.4g} nats at row {i + 2} "
                                    f"(above {MAX_LOSS:g}: a spike, or not a loss in nats)"))
        if finite.size < e.value.size:
            findings.append(Finding("non_finite", e.rel, f"{e.value.size - finite.size} non-finite value(s)"))
        if np.any(np.diff(e.x) <= 0):
            i = int(np.argmax(np.diff(e.x) <= 0))
            findings.append(Finding("x_not_increasing", e.rel, f"x-axis does not increase at row {i + 3}"))

    # Same-curve groups: byte-identical copies and the same curve against other x-axes.
    parent = list(range(len(exports)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_len: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(exports):
        by_len[len(e.value)].append(i)
    for idx in by_len.values():
        for a_pos, a in enumerate(idx):
            for b in idx[a_pos + 1:]:
                if find(a) != find(b) and (exports[a].sha256 == exports[b].sha256
                                           or _same_curve(exports[a], exports[b])):
                    parent[find(b)] = find(a)
    groups: dict[int, list[Export]] = defaultdict(list)
    for i, e in enumerate(exports):
        groups[find(i)].append(e)

    # What size do nominal labels in run names stand for? Learned from the files in size folders.
    evidence: dict[str, Counter] = defaultdict(Counter)
    for members in groups.values():
        seen = set()
        for e in members:
            if e.folder_size and e.name_size and (e.name_size, e.folder_size) not in seen:
                seen.add((e.name_size, e.folder_size))
                evidence[e.name_size][e.folder_size] += 1
    aliases: dict[str, str] = {}
    for name, counts in evidence.items():
        top = max(counts.values())
        best = sorted(k for k, v in counts.items() if v == top)
        aliases[name] = name if name in best else best[0]
    for name, target in sorted(aliases.items()):
        if name != target:
            findings.append(Finding("size_alias", name, f"run names labelled {name} sit in {target} size folders "
                                    f"({dict(evidence[name])}); files outside size folders use {target}",
                                    defect=False))

    def rank(e: Export):
        agrees = e.folder_size is not None and e.folder_size in (e.name_size, aliases.get(e.name_size or ""))
        return (e.non_ascii, e.ppl_converted, e.copy_suffix, e.folder_size is None, not agrees, e.folder_metric_conflict,
                e.tensorboard_prefix, -e.overlap, e.deprecated, e.rel)

    runs: list[PlannedRun] = []
    for members in sorted(groups.values(), key=lambda m: min(rank(e) for e in m)):
        members.sort(key=rank)
        run = _plan_group(members, sizes, aliases, findings)
        if run is not None:
            runs.append(run)
    runs.sort(key=lambda r: (r.init_objective is not None, r.rel))
    return Plan(root=root, runs=runs, findings=findings, n_files=len(paths), aliases=aliases)


def _plan_group(members: list[Export], sizes: dict[str, int], aliases: dict[str, str],
                findings: list[Finding]) -> PlannedRun | None:
    canon = members[0]
    defects: list[str] = []

    def flag(code, path, message, defect=True):
        findings.append(Finding(code, path, message, defect))
        if defect and code not in defects:
            defects.append(code)

    # Copies of the same bytes (or the same values on the same axis): one is imported, the rest reported.
    by_axis: dict[str, Export] = {}
    for e in members:
        if e.axis not in by_axis:
            by_axis[e.axis] = e
            continue
        kept = by_axis[e.axis]
        same_bytes = e.sha256 == kept.sha256
        sizes_differ = bool(e.folder_size and kept.folder_size and e.folder_size != kept.folder_size)
        code = "duplicate_size_conflict" if sizes_differ else "duplicate"
        what = "byte-identical to" if same_bytes else "the same curve as"
        where = f" (size folders {kept.folder_size} and {e.folder_size}: imported as {kept.folder_size})" \
            if sizes_differ else ""
        flag(code, e.rel, f"{what} {kept.rel}{where}; not imported again")

    objective = canon.objective or next((e.objective for e in members if e.objective), None)
    if objective is None:
        flag("unknown_objective", canon.rel, "cannot tell CLM or MLM from the name or folders; skipped")
        return None
    metric = next((e.metric for e in members if e.metric_from_tag), None) or canon.metric or c.VAL_LOSS
    tagged = {e.metric for e in members if e.metric_from_tag}
    if len(tagged) > 1:
        flag("metric_conflict", canon.rel, f"copies of this curve are tagged {sorted(tagged)}; using {metric}")

    # Size: folder > name (through the learned aliases) > nearest in the map; the axes overrule all.
    size = source = None
    if canon.folder_size:
        size, source = canon.folder_size, "folder"
    else:
        name_size = canon.name_size or next((e.name_size for e in members if e.name_size), None)
        if name_size and aliases.get(name_size, name_size) in sizes and aliases.get(name_size) not in (None, name_size):
            size, source = aliases[name_size], "name+folders"
        elif name_size and name_size in sizes:
            size, source = name_size, "name"
        elif name_size:
            near = _nearest(sizes, size_value(name_size), NEAREST_TOL)
            if near:
                size, source = near, "nearest"
                flag("size_nearest", canon.rel, f"size label {name_size} is not in the size map; using the "
                     f"nearest, {near} (N={sizes[near]:,})", defect=False)
    if size is not None and size not in sizes:
        near = _nearest(sizes, size_value(size), NEAREST_TOL)
        if near:
            flag("size_nearest", canon.rel, f"size label {size} is not in the size map; using the nearest, "
                 f"{near} (N={sizes[near]:,})", defect=False)
            size = near
        else:
            size = None

    n_rows = len(canon.value)
    flops_e = by_axis.get("flops")
    tok_e = by_axis.get("tokens") or by_axis.get("samples")
    meas_flops = flops_e.x * flops_e.axis_scale if flops_e is not None else None
    meas_tokens = None
    if tok_e is not None:
        meas_tokens = tok_e.x * tok_e.axis_scale * (tok_e.seq_len if tok_e.axis == "samples" else 1)
    if meas_flops is not None and meas_tokens is not None:
        ok = meas_tokens > 0
        n_meas = float(np.median(meas_flops[ok] / (6.0 * meas_tokens[ok])))
        snapped = _nearest(sizes, n_meas, AXIS_TOL)
        if snapped is None:
            flag("axis_inconsistent", canon.rel, f"FLOPs/(6·tokens) of {flops_e.rel} and {tok_e.rel} implies "
                 f"N={n_meas:,.0f}, no size of the map within {AXIS_TOL:.0%}"
                 + (f"; keeping {size} (N={sizes[size]:,})" if size else ""))
        elif size is not None and snapped != size:
            flag("axis_inconsistent", canon.rel, f"FLOPs/(6·tokens) of {flops_e.rel} and {tok_e.rel} implies "
                 f"N={n_meas:,.0f} ({snapped}), but the {source} says {size} (N={sizes[size]:,}); using {snapped}")
            size, source = snapped, "axes"
        elif size is None:
            size, source = snapped, "axes"
        name_size = canon.name_size or next((e.name_size for e in members if e.name_size), None)
        if ("axis_inconsistent" not in defects and name_size in sizes and name_size != size
                and abs(math.log(sizes[name_size] / n_meas)) > math.log1p(AXIS_TOL)):
            flag("axis_inconsistent", canon.rel, f"the name's size label {name_size} (N={sizes[name_size]:,}) is "
                 f"inconsistent with 6·N·tokens: FLOPs/(6·tokens) of {flops_e.rel} and {tok_e.rel} gives "
                 f"N={n_meas:,.0f} ({size}, {source}); imported as {size}")
    if size is None:
        flag("unknown_size", canon.rel, "cannot tell the model size (no <SIZE>_flops folder, no size in the name "
             "near one of the size map); add it with --size-map; skipped")
        return None
    n = float(sizes[size])

    seq_len = tok_e.seq_len if tok_e is not None else canon.seq_len
    if meas_flops is not None:
        flops = meas_flops
        tokens = meas_tokens if meas_tokens is not None else flops / (6.0 * n)
    else:
        tokens = meas_tokens
        flops = 6.0 * n * tokens

    budget = canon.budget if canon.budget is not None else next((e.budget for e in members if e.budget), None)
    budgets = {e.budget for e in members if e.budget is not None}
    if len(budgets) > 1:
        flag("budget_conflict", canon.rel, f"copies of this curve name different budgets {sorted(budgets)}")
    tokens_target = canon.tokens_target
    budget_source = "name"
    final_flops = float(flops[-1])
    if budget is None and tokens_target is not None:
        budget, budget_source = 6.0 * n * tokens_target, "tokens_target"
    if budget is None:
        budget, budget_source = final_flops, "curve_end"
        flag("budget_from_curve", canon.rel, f"no budget in the name: budget = FLOPs at the curve's end "
             f"({final_flops:.3g})", defect=False)
    else:
        ratio = final_flops / budget
        if abs(ratio - 1) > BUDGET_TOL:
            flag("budget_mismatch", canon.rel, f"the curve ends at {final_flops:.3g} FLOPs = {ratio:.2f}× the "
                 f"budget {budget:.3g} (size {size}, N={n:,.0f}: stopped early, or N wrong for 6·N·tokens?)")
    if tokens_target is None:
        tokens_target = budget / (6.0 * n)

    init_objective = canon.init_objective or next((e.init_objective for e in members if e.init_objective), None)
    init_budget = canon.init_budget or next((e.init_budget for e in members if e.init_budget), None)
    if any(e.non_ascii for e in members) and "non_ascii" not in defects:
        defects.append("non_ascii")
    for f in findings:
        if f.defect and f.path in {e.rel for e in members} and f.code not in defects:
            defects.append(f.code)
    timestamps = np.round(canon.wall * 1000).astype(np.int64)
    return PlannedRun(
        files=members, objective=objective, size=size, n=n, budget=float(budget),
        tokens_target=float(tokens_target), metric=metric, steps=np.arange(1, n_rows + 1, dtype=np.int64),
        timestamps=timestamps, value=canon.value, tokens=np.asarray(tokens, dtype=np.float64),
        flops=np.asarray(flops, dtype=np.float64), seq_len=int(seq_len), size_source=source,
        budget_source=budget_source, init_objective=init_objective, init_budget=init_budget,
        lr=canon.lr if canon.lr is not None else next((e.lr for e in members if e.lr), None),
        defects=defects)
