"""TensorBoard CSV exports (``Wall time,Step,Value``): the file-name grammar and parsing of one export.

Step 1 of ``protscale import tb-csv`` (then ``tb_plan``: grouping curves into runs; ``import_tb``: writing
them to MLflow).

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
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protscale.errors import UserError
from protscale.model.sizes import PAPER_SIZES

from . import contract as c

# Size labels of the paper's released logs -> N = 12·L·d² (README of data/reference-logs): the table kept
# once, in ``protscale.model.sizes``.
DEFAULT_SIZE_MAP: dict[str, int] = {name: s.reference_n for name, s in PAPER_SIZES.items()}

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
