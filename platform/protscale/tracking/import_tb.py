"""``protscale import tb-csv``: TensorBoard CSV exports (``Wall time,Step,Value``) -> MLflow runs.

Built for the layout of the paper's released logs (``data/training_logs`` of cxysteven/ScalingProteinLM)
but nothing here is specific to particular files beyond parsing names:

* **File name** ``[dep-]run-<RUN>-tag-<TAG> vs <AXIS>[ (k)].csv`` (TensorBoard's export name) or a bare
  ``<SIZE>_<C>[_clm_pretrain_<C0>].csv``. ``<RUN>`` fields (``_``-separated) give the objective
  (``gpt``/``clm`` -> clm, ``mlm``/``esm`` -> mlm), a size label (``130M``, ``1.7b``), the budget
  (``1e19flops``), a token target (``tk200b``), the peak LR (``lr5.0`` = 5.0e-4, ``lr4e-4``), the data
  (``all0.25ep``, ``ur50``), and for transfer runs ``<obj><C>_transfer_from_<obj0><C0>_<SIZE>``.
  ``<TAG>`` says validation / training / test loss and whether the values are a perplexity; ``<AXIS>``
  is ``gigaflos`` (any ``<prefix>flops``: compute, 6·N·tokens), ``tokens`` or ``samples``.
* **Folders**: ``<SIZE>_flops`` (or a bare size label) sets the model size; otherwise the nearest folder
  naming ``gpt``/``clm``/``mlm``, ``valid``/``train``, ``tokens``/``samples``/``flops`` fills in what the
  file name lacks.
* **Sizes** map to a parameter count N through the size map (default: the table of
  ``data/reference-logs/README.md``; ``--size-map FILE.json`` adds or overrides ``{"label": N}``).
  Run names use nominal labels that differ from the folders (``gpt_130M`` in ``127M_flops``); the
  importer learns that mapping from the files that sit in size folders and applies it to files that do
  not (e.g. ``transfer_from_gpt1e18_25M`` -> the size the ``gpt_25M`` runs were filed under). A label
  with no evidence and no entry takes the nearest size in the map (within 25%), reported as a note.

Curves, not files, become runs. Files are grouped when they hold the same curve -- byte-identical copies
(imported once, every other copy reported as a defect and listed in the run's ``import_files`` tag), or
the same (wall time, value) sequence exported against another x-axis (merged into one run: tokens come
from the tokens/samples export, FLOPs from the compute export, and FLOPs/(6·tokens) is checked against
N). Where only one axis exists: compute axis -> tokens = FLOPs / (6·N); tokens -> FLOPs = 6·N·tokens;
samples -> tokens = samples·seq_len.

Each run follows ``contract``: params objective, size, n_params, n_params_non_embedding (both N: the
vocabulary is tiny), budget_flops, tokens_target, seq_len, mask_ratio, flops_convention, lr_max where
named, init_from / init_objective / init_budget_flops for transfer runs; tags source=imported,
kind=trial, status=completed (diverged if a value is not finite), sweep, trial, the sweep's parent run,
plus the import tags below; metrics ``val_loss`` / ``train_loss`` / ``test_loss`` and ``tokens``,
``flops`` at the same steps. **Step** = 1-based index of the point in the export (TensorBoard keeps at
most 1000 evenly spread points, so optimizer steps are unknown); timestamps are the wall times.

Defects reported (and written to the run's ``defects`` tag), never silently fitted:
``duplicate`` (byte-identical curve under another path; ``duplicate_size_conflict`` when the copies sit
in different size folders), ``axis_inconsistent`` (FLOPs/(6·tokens) disagrees with N by > 3%),
``budget_mismatch`` (the curve ends more than 10% away from the budget in its name: stopped early, or N
wrong), ``perplexity`` (a ``ppl`` export that holds perplexities: logged as ln(value)),
``value_range`` (a loss above 10 nats), ``x_not_increasing``, ``non_finite``, ``non_ascii`` (a path
with non-ASCII characters), ``parse_error`` (file:line), ``unknown_objective|size|axis`` (file skipped).

Idempotent: a curve is skipped when a finished imported run in the experiment already lists one of its
files (``import_files``, relative to DIR) or its content hash; an unfinished one (an interrupted import)
is deleted and imported again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from protscale.cli import UserError
from protscale.model.sizes import PAPER_SIZES

from . import contract as c
from .runs import experiment_id

# --- tags written by this importer (strings shared with the analysis live in contract.py) -------------
IMPORT_PATH = "import_path"          # the curve's canonical file, relative to the imported DIR
IMPORT_FILES = "import_files"        # every file holding this curve (copies, other axes), one per line
IMPORT_SHA256 = "import_sha256"      # sha256 of every such file, one per line
DEFECTS = c.DEFECTS                  # comma-separated defect codes ("" when clean)
TB_RUN = "tb_run"                    # the run name inside the export's file name
TB_TAG = "tb_tag"                    # the TensorBoard tag
X_AXES = "x_axes"                    # the exported x-axes merged into this run, e.g. "flops,tokens"
SIZE_SOURCE = "size_source"          # folder | name | name+folders | nearest | axes
BUDGET_SOURCE = c.BUDGET_SOURCE      # name | tokens_target | curve_end
INIT_OBJECTIVE = c.INIT_OBJECTIVE
INIT_BUDGET_FLOPS = c.INIT_BUDGET_FLOPS

FLOPS_CONVENTION_6N = "6N"           # flops = 6 · N(non-embedding) · tokens, as the exports' axis

# Size labels of the paper's released logs -> N = 12·L·d² (README of data/reference-logs): the table kept
# once, in ``protscale.model.sizes``.
DEFAULT_SIZE_MAP: dict[str, int] = {name: s.reference_n for name, s in PAPER_SIZES.items()}

AXIS_TOL = 0.03           # FLOPs/(6·tokens) vs N
BUDGET_TOL = 0.10         # curve end vs budget in the name
NEAREST_TOL = 0.25        # a size label not in the map takes the nearest size within this ratio
PPL_MEDIAN = 4.5          # a "ppl" export whose median is above this holds perplexities
MAX_LOSS = 10.0           # a loss (nats) above this is reported
TWIN_WALL_S = 1.0         # same curve: wall times within this many seconds ...
TWIN_REL = 1e-5           # ... and values within this relative difference (after ln of perplexities)
MAX_METRICS_PER_CALL = 1000

_UNIT = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMbBtT])$")
_BUDGET = r"(\d+(?:\.\d+)?e[+-]?\d+)"
_TRANSFER_RE = re.compile(rf"^(gpt|clm|mlm|esm)_?{_BUDGET}_transfer_from_(gpt|clm|mlm|esm)_?{_BUDGET}_"
                          r"(\d+(?:\.\d+)?[kKmMbBtT])(?:_.*)?$", re.I)
_PAIR_RE = re.compile(rf"^(\d+(?:\.\d+)?[kKmMbBtT])_{_BUDGET}(?:_(gpt|clm|mlm|esm)_pretrain_{_BUDGET})?$", re.I)
_COPY_RE = re.compile(r"^(.*?)\s*\((\d+)\)$")
_FOLDER_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?[kKmMbBtT])(?:_(?:flops|params|models?))?$")
_AXIS_FLOPS_RE = re.compile(r"(kilo|mega|giga|tera|peta|exa)?flo[a-z]*s\b", re.I)
_SCALE = {None: 1.0, "kilo": 1e3, "mega": 1e6, "giga": 1e9, "tera": 1e12, "peta": 1e15, "exa": 1e18}


def norm_size(label: str) -> str | None:
    m = _SIZE_RE.match(label.strip())
    if not m:
        return None
    num, unit = m.groups()
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num + unit.upper()


def size_value(label: str) -> float:
    m = _SIZE_RE.match(label)
    return float(m.group(1)) * _UNIT[m.group(2).upper()]


def _objective(word: str) -> str | None:
    w = word.lower()
    if w.startswith(("gpt", "clm")):
        return "clm"
    if w.startswith(("mlm", "esm", "bert")):
        return "mlm"
    return None


def load_size_map(path: str | Path | None) -> dict[str, int]:
    sizes = dict(DEFAULT_SIZE_MAP)
    if path is None:
        return sizes
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--size-map {p}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--size-map {p}: expected a JSON object {{\"label\": N, ...}}")
    for label, n in raw.items():
        key = norm_size(str(label)) or str(label)
        if isinstance(n, dict):
            n = n.get(c.N_PARAMS_NON_EMBEDDING, n.get(c.N_PARAMS))
        if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0:
            raise UserError(f"--size-map {p}: {label!r} must map to a positive parameter count, got {n!r}")
        sizes[key] = int(n)
    return sizes


# --- reports ---------------------------------------------------------------------------------------------
@dataclass
class Finding:
    code: str
    path: str
    message: str
    defect: bool = True      # False: a note (an inference worth knowing), not a defect of the data

    def __str__(self) -> str:
        return f"{self.code}: {self.path}: {self.message}"


# --- one CSV export --------------------------------------------------------------------------------------
@dataclass
class Export:
    rel: str
    sha256: str
    wall: np.ndarray
    x: np.ndarray
    value: np.ndarray
    axis: str                        # "flops" | "tokens" | "samples"
    axis_scale: float                # multiply x by this to get FLOPs / tokens / samples
    metric: str | None               # from the tag or folders; None: unknown (val_loss by default)
    metric_from_tag: bool
    ppl: bool
    label: str                       # the run name of the export
    tb_tag: str
    objective: str | None
    name_size: str | None
    folder_size: str | None
    budget: float | None
    tokens_target: float | None
    init_objective: str | None = None
    init_budget: float | None = None
    lr: float | None = None
    seq_len: int | None = None
    data: str | None = None
    epochs: float | None = None
    copy_suffix: bool = False
    deprecated: bool = False
    tensorboard_prefix: bool = False
    folder_metric_conflict: bool = False
    overlap: int = 0
    non_ascii: bool = False
    ppl_converted: bool = False


class ParseError(Exception):
    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def read_csv(path: Path, rel: str) -> tuple[bytes, np.ndarray]:
    """The raw bytes and an (n, 3) float array; ParseError 'rel:line: why' on anything unexpected."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows: list[tuple[float, float, float]] = []
    header_seen = False
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise ParseError(f"{rel}:{lineno}", "not UTF-8 text") from None
        if not line:
            continue
        if not header_seen:
            cols = [h.strip().lower() for h in line.split(",")]
            if cols != ["wall time", "step", "value"]:
                raise ParseError(f"{rel}:{lineno}", f"expected the header 'Wall time,Step,Value', got {line[:80]!r}")
            header_seen = True
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise ParseError(f"{rel}:{lineno}", f"expected 3 comma-separated numbers, got {len(parts)} fields: "
                             f"{line[:80]!r}")
        try:
            rows.append((float(parts[0]), float(parts[1]), float(parts[2])))
        except ValueError:
            raise ParseError(f"{rel}:{lineno}", f"not a number in {line[:80]!r}") from None
    if not header_seen:
        raise ParseError(f"{rel}:1", "empty file (expected the header 'Wall time,Step,Value')")
    if not rows:
        raise ParseError(f"{rel}:{len(lines)}", "no data rows after the header")
    return data, np.asarray(rows, dtype=np.float64)


def _words(s: str) -> list[str]:
    return [w for w in re.split(r"[_\-\s./]+", s) if w]


def parse_export(path: Path, root: Path, seq_len_default: int, findings: list[Finding]) -> Export | None:
    rel = path.relative_to(root).as_posix()
    try:
        data, arr = read_csv(path, rel)
    except ParseError as exc:
        findings.append(Finding("parse_error", exc.where, f"{exc.why}; file skipped"))
        return None
    stem = path.name[:-4] if path.name.lower().endswith(".csv") else path.name
    copy_suffix = False
    m = _COPY_RE.match(stem)
    if m:
        stem, copy_suffix = m.group(1), True
    axis_str = ""
    if " vs " in stem:
        stem, axis_str = stem.rsplit(" vs ", 1)
    label, tb_tag, deprecated = stem, "", False
    if "-tag-" in stem:
        label, tb_tag = stem.split("-tag-", 1)
    if "run-" in label:
        before, label = label.split("run-", 1)
        deprecated = before.strip("-_").lower().startswith("dep")
    if label.endswith(".sh"):
        label = label[:-3]
    core = label
    tensorboard_prefix = False
    if core.lower().startswith("tensorboard_"):
        core, tensorboard_prefix = core[len("tensorboard_"):], True
    folders = list(reversed(path.relative_to(root).parts[:-1]))      # deepest first

    # x-axis
    axis, scale = None, 1.0
    for candidate in ([axis_str] if axis_str else []) + list(folders):
        low = candidate.lower()
        fm = _AXIS_FLOPS_RE.search(low)
        if "token" in low:
            axis = "tokens"
        elif "sample" in low:
            axis = "samples"
        elif fm or low in ("compute", "flops"):
            axis, scale = "flops", _SCALE[fm.group(1).lower() if fm and fm.group(1) else None]
        if axis:
            break
    if axis is None:
        findings.append(Finding("unknown_axis", rel, "cannot tell the x-axis (no 'vs tokens|samples|gigaflos' in "
                                "the name nor a tokens/samples/flops folder); file skipped"))
        return None

    # metric
    metric, from_tag = None, False
    tag_low = tb_tag.lower()
    for src, text in [("tag", tag_low)] + [("folder", f.lower()) for f in folders]:
        if "valid" in text or re.search(r"\bval\b", text):
            metric = c.VAL_LOSS
        elif "train" in text:
            metric = c.TRAIN_LOSS
        elif "test" in text:
            metric = c.TEST_LOSS
        if metric:
            from_tag = src == "tag"
            break
    folder_metric_conflict = False
    if from_tag:
        for f in folders:
            low = f.lower()
            other = (c.VAL_LOSS if "valid" in low else c.TRAIN_LOSS if "train" in low else None)
            if other and other != metric:
                folder_metric_conflict = True
    ppl = "ppl" in tag_low or "perplexity" in tag_low

    # name fields
    objective = name_size = init_objective = None
    budget = init_budget = tokens_target = lr = epochs = None
    seq_len = data_name = None
    tm = _TRANSFER_RE.match(core)
    pm = _PAIR_RE.match(core)
    if tm:
        objective, budget = _objective(tm.group(1)), float(tm.group(2))
        init_objective, init_budget = _objective(tm.group(3)), float(tm.group(4))
        name_size = norm_size(tm.group(5))
    elif pm:
        name_size, budget = norm_size(pm.group(1)), float(pm.group(2))
        if pm.group(3):
            init_objective, init_budget = _objective(pm.group(3)), float(pm.group(4))
    fields = core.split("_")
    if not tm and not pm:
        objective = _objective(fields[0]) if fields else None
    for f in fields:
        if name_size is None and _SIZE_RE.match(f):
            name_size = norm_size(f)
        if budget is None and (bm := re.fullmatch(rf"{_BUDGET}flops", f, re.I)):
            budget = float(bm.group(1))
        if (km := re.fullmatch(r"tk(\d+(?:\.\d+)?)([kmbt])", f, re.I)):
            tokens_target = float(km.group(1)) * _UNIT[km.group(2).upper()]
        if (lm := re.fullmatch(r"lr(\d+(?:\.\d+)?(?:e-?\d+)?)", f, re.I)):
            v = float(lm.group(1))
            lr = v if "e" in lm.group(1).lower() else v * 1e-4
        if (cm := re.fullmatch(r"(?:cl|seq|ctx)(\d+)", f, re.I)):
            seq_len = int(cm.group(1))
        if (dm := re.fullmatch(r"(all|ur50|ur90|uniref50|uniref90)(\d+(?:\.\d+)?)?ep", f, re.I)):
            data_name, epochs = dm.group(1).lower(), float(dm.group(2) or 1)
        elif f.lower() in ("ur50", "uniref50") and data_name is None:
            data_name = "ur50"
    if objective is None:
        for folder in folders:
            objs = {o for w in _words(folder) if (o := _objective(w)) and w.lower() in
                    ("gpt", "clm", "mlm", "esm", "bert")}
            if len(objs) == 1:
                objective = objs.pop()
                break
    folder_size = None
    for folder in folders:
        fm = _FOLDER_SIZE_RE.match(folder)
        if fm:
            folder_size = norm_size(fm.group(1))
            break

    wall, x, value = arr[:, 0], arr[:, 1], arr[:, 2]
    label_words = {w.lower() for w in _words(core)}
    overlap = sum(len(label_words & {w.lower() for w in _words(f)}) for f in folders)
    return Export(
        rel=rel, sha256=hashlib.sha256(data).hexdigest(), wall=wall, x=x, value=value, axis=axis,
        axis_scale=scale, metric=metric, metric_from_tag=from_tag, ppl=ppl, label=label, tb_tag=tb_tag,
        objective=objective, name_size=name_size, folder_size=folder_size, budget=budget,
        tokens_target=tokens_target, init_objective=init_objective, init_budget=init_budget, lr=lr,
        seq_len=seq_len or seq_len_default, data=data_name, epochs=epochs, copy_suffix=copy_suffix,
        deprecated=deprecated, tensorboard_prefix=tensorboard_prefix,
        folder_metric_conflict=folder_metric_conflict, overlap=overlap, non_ascii=not rel.isascii())


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


# --- writing to MLflow ------------------------------------------------------------------------------------
@dataclass
class Summary:
    imported: list[tuple[str, str]] = field(default_factory=list)      # (rel, run_id)
    skipped: list[str] = field(default_factory=list)                   # rel of curves already there
    replaced: list[str] = field(default_factory=list)                  # unfinished runs deleted and redone
    findings: list[Finding] = field(default_factory=list)
    experiment_id: str = ""

    @property
    def defects(self) -> list[Finding]:
        return [f for f in self.findings if f.defect]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def import_tb_csv(root: str | Path, experiment: str, tracking_uri: str | None = None,
                  size_map: dict[str, int] | None = None, sweep: str | None = None, seq_len: int = 1024,
                  dry_run: bool = False, out: Callable[[str], None] = print, verbose: bool = False) -> Summary:
    """Import every TensorBoard CSV export under ``root`` into ``experiment`` (see the module docstring)."""
    plan = scan(root, size_map, seq_len, progress=out)
    summary = Summary(findings=plan.findings)
    sweep = sweep or experiment
    if dry_run:
        for i, r in enumerate(plan.runs, 1):
            out(f"[{i}/{len(plan.runs)}] would import {_describe(r)}")
        _report(plan, summary, out, verbose, dry_run=True)
        return summary

    from mlflow.entities import Metric, Param, ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = c.resolve_tracking_uri(tracking_uri or c.default_tracking_uri())
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is not None and exp.lifecycle_stage != "active":
            raise UserError(f"experiment {experiment!r} is deleted in {uri}; restore it or choose another name")
        exp_id = exp.experiment_id if exp else experiment_id(uri, experiment)   # artifacts beside a SQLite store
    except MlflowException as exc:
        raise UserError(f"{uri}: {exc.message}") from None
    summary.experiment_id = exp_id

    # What is already there (idempotency) and the sweep's parent run.
    existing = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.{c.SOURCE} = '{c.SOURCE_IMPORTED}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50_000, page_token=token)
        existing.extend(page)
        token = page.token
        if not token:
            break
    done_paths: dict[str, str] = {}
    done_hashes: dict[str, str] = {}
    parent_id = None
    known: list[tuple[str, str, str, float, str]] = []       # (run_id, objective, size, budget, metric)
    for r in existing:
        tags = r.data.tags
        if tags.get(c.KIND) == "sweep" and tags.get(c.SWEEP) == sweep:
            parent_id = parent_id or r.info.run_id
            continue
        if IMPORT_FILES not in tags:
            continue
        if r.info.status != "FINISHED":
            client.delete_run(r.info.run_id)
            summary.replaced.append(tags.get(IMPORT_PATH, r.info.run_id))
            continue
        for p in tags[IMPORT_FILES].splitlines():
            done_paths[p] = r.info.run_id
        for h in tags.get(IMPORT_SHA256, "").splitlines():
            done_hashes[h] = r.info.run_id
        pr = r.data.params
        try:
            known.append((r.info.run_id, pr.get(c.OBJECTIVE, ""), pr.get(c.SIZE, ""),
                          float(pr.get(c.BUDGET_FLOPS, "nan")), tags.get("metric", "")))
        except ValueError:
            pass

    todo = []
    for r in plan.runs:
        hit = next((done_paths[e.rel] for e in r.files if e.rel in done_paths), None) or \
            next((done_hashes[e.sha256] for e in r.files if e.sha256 in done_hashes), None)
        if hit:
            summary.skipped.append(r.rel)
        else:
            todo.append(r)
    if summary.skipped:
        out(f"{len(summary.skipped)} curve(s) already imported into {experiment!r}: skipped")

    if todo and parent_id is None:
        parent = client.create_run(exp_id, run_name=f"{sweep} (imported)", tags={
            c.KIND: "sweep", c.SWEEP: sweep, c.SOURCE: c.SOURCE_IMPORTED, c.STATUS: c.STATUS_COMPLETED,
            IMPORT_PATH: str(Path(root).resolve())})
        parent_id = parent.info.run_id
        client.set_terminated(parent_id, "FINISHED")

    for i, r in enumerate(todo, 1):
        init_from = ""
        if r.init_objective:
            match = [k for k in known if k[1] == r.init_objective and k[2] == r.size
                     and r.init_budget and math.isclose(k[3], r.init_budget, rel_tol=1e-6)]
            match.sort(key=lambda k: k[4] != c.VAL_LOSS)
            init_from = match[0][0] if match else f"{r.init_objective}:{r.size}:{_fmt(r.init_budget or 0)}"
        params = {
            c.OBJECTIVE: r.objective, c.SIZE: r.size, c.N_PARAMS: int(r.n), c.N_PARAMS_NON_EMBEDDING: int(r.n),
            c.BUDGET_FLOPS: _fmt(r.budget), c.TOKENS_TARGET: _fmt(r.tokens_target), c.SEQ_LEN: r.seq_len,
            c.MASK_RATIO: 0.15 if r.objective == "mlm" else 0.0, c.FLOPS_CONVENTION: FLOPS_CONVENTION_6N,
            c.INIT_FROM: init_from,
        }
        if r.lr is not None:
            params[c.LR_MAX] = _fmt(r.lr)
        if r.init_objective:
            params[INIT_OBJECTIVE] = r.init_objective
            params[INIT_BUDGET_FLOPS] = _fmt(r.init_budget or float("nan"))
        finite = bool(np.all(np.isfinite(r.value)))
        canon = r.canonical
        tags = {
            c.SWEEP: sweep, c.SOURCE: c.SOURCE_IMPORTED, c.KIND: "trial", c.TRIAL: r.rel,
            c.STATUS: c.STATUS_COMPLETED if finite else c.STATUS_DIVERGED, c.PARENT_RUN_ID: parent_id,
            IMPORT_PATH: r.rel, IMPORT_FILES: "\n".join(e.rel for e in r.files),
            IMPORT_SHA256: "\n".join(dict.fromkeys(e.sha256 for e in r.files)), DEFECTS: ",".join(r.defects),
            TB_RUN: canon.label, TB_TAG: canon.tb_tag, X_AXES: ",".join(dict.fromkeys(e.axis for e in r.files)),
            SIZE_SOURCE: r.size_source, BUDGET_SOURCE: r.budget_source, "metric": r.metric,
        }
        if canon.data:
            tags["data"] = canon.data
        if canon.epochs is not None:
            tags["epochs"] = _fmt(canon.epochs)
        run = client.create_run(exp_id, start_time=int(r.timestamps[0]), run_name=r.run_name,
                                tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        metrics = []
        for key, arr in ((r.metric, r.value), (c.TOKENS, r.tokens), (c.FLOPS, r.flops)):
            metrics.extend(Metric(key, float(v), int(t), int(s)) for v, t, s in zip(arr, r.timestamps, r.steps))
        param_list = [Param(k, str(v)) for k, v in params.items()]
        first = MAX_METRICS_PER_CALL - len(param_list)
        client.log_batch(run_id, metrics=metrics[:first], params=param_list)
        for j in range(first, len(metrics), MAX_METRICS_PER_CALL):
            client.log_batch(run_id, metrics=metrics[j:j + MAX_METRICS_PER_CALL])
        client.set_terminated(run_id, "FINISHED", end_time=int(r.timestamps[-1]))
        known.append((run_id, r.objective, r.size, r.budget, r.metric))
        summary.imported.append((r.rel, run_id))
        out(f"[{i}/{len(todo)}] {_describe(r)} -> run {run_id[:8]}")
    _report(plan, summary, out, verbose, dry_run=False, experiment=experiment, uri=uri)
    return summary


def _describe(r: PlannedRun) -> str:
    extra = f" +{len(r.files) - 1} file(s)" if len(r.files) > 1 else ""
    init = f" from {r.init_objective} {r.init_budget:.3g}" if r.init_objective else ""
    flags = f" [{','.join(r.defects)}]" if r.defects else ""
    return (f"{r.rel}{extra}: {r.objective} {r.size} C={r.budget:.3g}{init} {r.metric} "
            f"({len(r.value)} pts){flags}")


def _report(plan: Plan, summary: Summary, out, verbose: bool, dry_run: bool, experiment: str = "",
            uri: str = "") -> None:
    defects, notes = plan.defects, plan.notes
    if defects:
        out(f"defects ({len(defects)}):")
        for f in defects:
            out(f"  {f}")
    if notes:
        counts = Counter(f.code for f in notes)
        out(f"notes ({len(notes)}: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
            + ("" if verbose else "; --verbose lists them"))
        if verbose:
            for f in notes:
                out(f"  {f}")
    by_code = Counter(f.code for f in defects)
    codes = ", ".join(f"{k} {v}" for k, v in sorted(by_code.items())) or "none"
    files_in_runs = sum(len(r.files) for r in plan.runs)
    if dry_run:
        out(f"dry run: {plan.n_files} files -> {len(plan.runs)} runs ({files_in_runs} files in them); "
            f"defects: {codes}")
    else:
        extra = f", {len(summary.replaced)} unfinished replaced" if summary.replaced else ""
        out(f"imported {len(summary.imported)} runs, skipped {len(summary.skipped)} already imported{extra} "
            f"({plan.n_files} files -> {len(plan.runs)} curves) into {experiment!r} at {uri}; defects: {codes}")
