"""How far to trust a fitted law: the warnings every law carries in ``results.json``, the report and ``plan``.

Three kinds, each a plain sentence that says what was measured and what it means:

* **not identifiable** (parametric law): basins whose objective is within ``basin_rel_tol`` of the best
  disagree on E, α or β (the data do not tell them apart), or α's or β's 95% interval reaches 0 or below
  (the loss may not fall with N, or with D, at all). A law whose α or β interval reaches ≤ 0, or whose
  near-equal basins disagree on the allocation exponent β/(α+β) by more than ``ALLOC_SPREAD``, is
  **unusable** for allocation: ``plan`` exits with :data:`EXIT_UNUSABLE` when every answer it would give
  rests on an unusable law.
* **extrapolation**: a budget outside the budgets the law was fitted on, "by how far" (``plan``; the fitted
  range is stored per law as ``budget_range``).
* **near the unigram baseline**: fitted losses within ``margin`` (relative) of the loss of a model that
  only knows residue frequencies. The default baseline is the entropy of the amino-acid composition of
  UniProtKB/Swiss-Prot (:data:`UNIGRAM_BASELINE_NATS`, 2.888 nats); ``protscale fit --unigram-baseline``
  sets another (e.g. a dataset's own). For the IsoFLOP frontier the losses are each budget's best run (any
  near the baseline is reported); for the parametric law and the envelope, their points (reported when at
  least ``POINT_SHARE`` are). A law fitted only on such losses describes noise: unusable.

A wide answer is also unusable: ``plan`` flags an N interval wider than a factor :data:`MAX_N_RATIO`.
"""

from __future__ import annotations

import math

import numpy as np

#: Exit status of ``protscale plan`` when the law(s) it answers from are unusable (answer still printed).
EXIT_UNUSABLE = 3

#: Amino-acid composition of UniProtKB/Swiss-Prot (percent; release statistics), for the default baseline.
SWISSPROT_COMPOSITION = {"A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07,
                         "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56,
                         "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87}


def _entropy(comp: dict) -> float:
    tot = sum(comp.values())
    return -sum(v / tot * math.log(v / tot) for v in comp.values() if v > 0)


#: Loss (nats/token) of predicting every residue from its frequency alone: 2.888 nats.
UNIGRAM_BASELINE_NATS = _entropy(SWISSPROT_COMPOSITION)
BASELINE_SOURCE = "entropy of the amino-acid composition of UniProtKB/Swiss-Prot"
BASELINE_MARGIN = 0.03     # a loss within 3% of the baseline has learnt little beyond residue frequencies
E_REL_SPREAD = 0.10        # near-equal basins whose E differ by more than 10% ...
EXP_SPREAD = 0.05          # ... or whose α or β differ by more than 0.05: not identifiable
ALLOC_SPREAD = 0.10        # near-equal basins whose β/(α+β) differ by more than this: unusable for allocation
MAX_N_RATIO = 100.0        # an N interval wider than this factor is no answer
POINT_SHARE = 0.25         # warn on the points of a law when at least this share is near the baseline


def baseline_info(nats: float | None = None, margin: float = BASELINE_MARGIN) -> dict:
    """The ``unigram_baseline`` block of results.json."""
    if nats is None:
        return {"nats": UNIGRAM_BASELINE_NATS, "source": BASELINE_SOURCE, "margin": margin}
    return {"nats": float(nats), "source": "given with --unigram-baseline", "margin": margin}


def baseline_warning(losses, baseline: dict, what: str, min_share: float = 0.0) -> tuple[str | None, bool]:
    """(warning, unusable) when losses a law was fitted on lie within the margin of the unigram baseline.

    ``what`` names the losses ("the IsoFLOP minima", "the points fitted"). Says nothing when fewer than
    ``min_share`` of them do; unusable when all of them do."""
    x = np.asarray([v for v in losses if v is not None and np.isfinite(v)], float)
    if x.size == 0 or not baseline:
        return None, False
    b, m = float(baseline["nats"]), float(baseline["margin"])
    near = x >= b * (1.0 - m)
    if not near.any() or near.mean() < min_share:
        return None, False
    every = bool(near.all())
    msg = (f"{'all' if every else f'{int(near.sum())} of {x.size}'} of {what} are at or above "
           f"{b * (1 - m):.4f} nats (lowest {x[near].min():.4f}): no better than {100 * m:.0f}% below the unigram "
           f"baseline {b:.3f} nats ({baseline['source']}): "
           + ("the models learnt little beyond residue frequencies, so the law describes noise"
              if every else "those models learnt little beyond residue frequencies"))
    return msg, every


def parametric_identifiability(par: dict) -> tuple[list[str], bool]:
    """(warnings, unusable) on whether the data pin the parametric law down."""
    out: list[str] = []
    unusable = False
    basins = [b for b in par.get("basins") or [] if all(b.get(k) is not None for k in ("E", "alpha", "beta"))]
    if len(basins) >= 2:
        E = np.array([b["E"] for b in basins], float)
        al = np.array([b["alpha"] for b in basins], float)
        be = np.array([b["beta"] for b in basins], float)
        diff = []
        if E.max() > (1 + E_REL_SPREAD) * E.min():
            diff.append(f"E from {E.min():.3g} to {E.max():.3g}")
        if al.max() - al.min() > EXP_SPREAD:
            diff.append(f"α from {al.min():.3g} to {al.max():.3g}")
        if be.max() - be.min() > EXP_SPREAD:
            diff.append(f"β from {be.min():.3g} to {be.max():.3g}")
        if diff:
            tol = 100 * float(par.get("basin_rel_tol") or 0.02)
            out.append(f"not identifiable: {len(basins)} basins fit within {tol:.0f}% of the best objective with "
                       + ", ".join(diff) + "; the data do not tell these laws apart")
        ae = np.array([b.get("allocation_exponent") if b.get("allocation_exponent") is not None else np.nan
                       for b in basins], float)
        fin = ae[np.isfinite(ae)]
        if fin.size < len(basins) or (fin.size and fin.max() - fin.min() > ALLOC_SPREAD):
            unusable = True
            span = f"{fin.min():.3f} to {fin.max():.3f}" if fin.size else "none finite"
            out.append(f"not identifiable for allocation: the near-equal basins give β/(α+β) {span}"
                       + ("" if fin.size == len(basins) else " (some have no compute-optimal size)"))
    for name, key in (("α", "alpha_ci95"), ("β", "beta_ci95")):
        iv = par.get(key)
        if iv and iv[0] is not None and iv[0] <= 0:
            unusable = True
            out.append(f"not identifiable: the 95% interval of {name}, [{iv[0]:.3g}, {iv[1]:.3g}], reaches 0 or "
                       f"below (the loss may not fall with {'model size' if name == 'α' else 'tokens'} at all)")
    return out, unusable


def transfer_warnings(tr: dict) -> tuple[list[str], bool]:
    """(warnings, unusable) of a fitted transfer law D_t = k·D_F^a·N^b."""
    out: list[str] = []
    unusable = False
    iv = tr.get("a_ci95")
    if iv and iv[0] is not None and iv[1] is not None and iv[0] <= 0 <= iv[1]:
        out.append(f"not identifiable: the 95% interval of a, [{iv[0]:.3g}, {iv[1]:.3g}], contains 0 (the data do "
                   "not say whether the transferred tokens grow with D_F)")
    if tr.get("b") is None:
        out.append("b not identified: every transfer pair has the same model size, so the law cannot say how "
                   "transfer changes with N; allocations at other sizes extrapolate")
    sr = tr.get("source_rule") or {}
    if sr.get("n_runs") is not None and sr["n_runs"] < 3:
        out.append(f"the source rule rests on {sr['n_runs']} transfer run(s)")
    if iv is None:
        out.append("no interval for a: too few bootstrap replicates succeeded")
        unusable = True
    return out, unusable


def extrapolation_warning(budget: float, budget_range) -> str | None:
    """A budget outside the range a law was fitted on, with by how far."""
    if not budget_range or not budget > 0:
        return None
    lo, hi = float(budget_range[0]), float(budget_range[1])
    if budget > hi * 1.0001:
        return f"extrapolation: {budget:.3g} FLOPs is {budget / hi:.1f}× above the largest budget sampled ({hi:.3g})"
    if budget < lo / 1.0001:
        return f"extrapolation: {budget:.3g} FLOPs is {lo / budget:.1f}× below the smallest budget sampled ({lo:.3g})"
    return None


def answer_warnings(law: dict, answer: dict, budget: float) -> tuple[list[str], bool]:
    """Warnings for one ``plan`` answer (N, D from a law) and whether it is unusable: the law's own warnings
    (``warnings``, ``unusable`` in results.json), extrapolation to ``budget``, and a too-wide interval."""
    out = list(law.get("warnings") or [])
    unusable = bool(law.get("unusable"))
    w = extrapolation_warning(budget, law.get("budget_range"))
    if w:
        out.append(w)
    iv = answer.get("n_ci95")
    if iv is None:
        out.append("no interval: too few bootstrap replicates succeeded (or none stored)")
    elif not (iv[0] > 0 and iv[1] / iv[0] <= MAX_N_RATIO):
        ratio = "unbounded" if not iv[0] > 0 else f"{iv[1] / iv[0]:.3g}×"
        out.append(f"the 95% interval of N, [{iv[0]:.3g}, {iv[1]:.3g}], spans {ratio} (more than {MAX_N_RATIO:.0f}×): "
                   "no usable answer")
        unusable = True
    return out, unusable
