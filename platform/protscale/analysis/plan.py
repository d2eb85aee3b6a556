"""``protscale plan``: the compute-optimal model size and tokens for a budget, from a results.json.

Every answer carries ``warnings`` (the law's own from results.json, extrapolation beyond the budgets it was
fitted on, a too-wide interval: ``trust.py``) and ``usable``; the whole answer is ``usable`` when at least one
of its answers is. ``protscale plan`` exits with ``trust.EXIT_UNUSABLE`` (3) when it is not.
"""

from __future__ import annotations

from protscale.errors import UserError

from . import allocation, repetition, trust


def _ci(iv, fmt="{:.3g}") -> str:
    return "n/a" if not iv else f"[{fmt.format(iv[0])}, {fmt.format(iv[1])}]"


def unique_tokens(data_dir) -> float:
    """Unique training tokens of a prepared dataset (its manifest's ``splits.train.tokens``)."""
    from protscale.data.shards import read_manifest

    tok = ((read_manifest(data_dir).get("splits") or {}).get("train") or {}).get("tokens")
    if not tok or not float(tok) > 0:
        raise UserError(f"{data_dir}/manifest.json has no splits.train.tokens: prepare the dataset again with "
                        "`protscale data prepare`")
    return float(tok)


def repetition_warnings(results: dict, p: dict, unique: float) -> list[str]:
    """Warnings for every phase of the answer that would repeat a dataset of ``unique`` tokens."""
    objs = results.get("objectives") or {}
    if p["objective"] == "both":
        s = p["split"]
        phases = [(s["source"], s["source_tokens"]), (s["target"], s["target_tokens"])]
    else:
        phases = [(p["objective"], (p.get(m) or {}).get("d")) for m in ("isoflop", "parametric")]
    out = []
    for obj, tokens in phases:
        if not tokens or tokens <= unique:
            continue
        rep = (objs.get(obj) or {}).get("repetition") or {}
        if rep.get("r_star"):
            msg = repetition.repetition_warning(tokens, unique, rep["r_star"])
        else:
            msg = (f"{tokens:.3g} tokens repeat the {unique:.3g} unique tokens of the dataset {tokens / unique:.1f} "
                   f"times, and the results have no fitted repetition law for {obj} to say what repeats are worth")
        if msg and f"{obj}: {msg}" not in out:
            out.append(f"{obj}: {msg}")
    return out


def plan(results: dict, budget_flops: float, objective: str, data=None) -> dict:
    """Answer for ``objective`` in {"clm", "mlm", ...} or "both" (source pre-training then target); with
    ``data`` (a prepared dataset) also warn when the answer would repeat its unique tokens."""
    p = _plan(results, budget_flops, objective)
    _trust(results, p)
    if data is not None:
        p["unique_tokens"] = unique_tokens(data)
        p["warnings"] += repetition_warnings(results, p, p["unique_tokens"])
    return p


def _trust(results: dict, p: dict) -> None:
    """Attach ``warnings`` and ``usable`` to every answer of ``p`` and to ``p`` itself."""
    objs = results.get("objectives") or {}
    C = p["budget_flops"]
    summary: list[str] = []

    def methods(obj: str, a: dict | None, tag: str = "") -> list[bool]:
        ok = []
        for m in ("isoflop", "parametric"):
            ans = (a or {}).get(m)
            if not ans or "n" not in ans:
                continue
            w, bad = trust.answer_warnings((objs.get(obj) or {}).get(m) or {}, ans, C)
            ans["warnings"], ans["usable"] = w, not bad
            summary.extend(f"{tag}{obj} {m}: {x}" for x in w)
            ok.append(not bad)
        return ok

    if p["objective"] == "both":
        s = p["split"]
        tgt = objs.get(s["target"]) or {}
        w, bad = trust.answer_warnings(tgt.get("parametric") or {}, s, C)
        tr = tgt.get("transfer") or {}
        s["warnings"], s["usable"] = w + list(tr.get("warnings") or []), not (bad or tr.get("unusable"))
        summary.extend(f"split ({s['target']} parametric law): {x}" for x in s["warnings"])
        methods(s["target"], p.get("target_alone"), "alone: ")
        p["usable"] = s["usable"]
    else:
        p["usable"] = any(methods(p["objective"], p))
    p["warnings"] = summary


def _plan(results: dict, budget_flops: float, objective: str) -> dict:
    if not budget_flops > 0:
        raise UserError("--budget-flops must be a positive number of FLOPs")
    objs = results.get("objectives") or {}
    if objective == "both":
        # CLM pre-training, then MLM training of the same model
        source, target = "clm", "mlm"
        try:
            split = allocation.transfer_split(results, budget_flops, target=target, source=source)
        except KeyError as exc:
            raise UserError(f"--objective both (CLM pre-training then MLM) needs a parametric law and a transfer "
                            f"fit of MLM runs initialised from CLM runs: {exc.args[0]} "
                            f"(objectives fitted: {', '.join(objs) or 'none'})") from None
        out = {"objective": "both", "budget_flops": budget_flops, "split": split,
               "target_alone": allocation.compute_optimal(objs[target], budget_flops)}
        return out
    if objective not in objs:
        raise UserError(f"the results file has no fit for objective {objective!r} "
                        f"(it has: {', '.join(objs) or 'none'})")
    r = objs[objective]
    co = allocation.compute_optimal(r, budget_flops)
    if not any("n" in (co.get(k) or {}) for k in ("isoflop", "parametric")):
        reasons = "; ".join(str((co.get(k) or r.get(k) or {}).get("reason")) for k in ("isoflop", "parametric"))
        raise UserError(f"objective {objective!r} has neither an IsoFLOP frontier nor a parametric law ({reasons})")
    return {"objective": objective, "budget_flops": budget_flops, **co}


def format_plan(p: dict) -> str:
    C = p["budget_flops"]
    lines = [f"budget C = {C:.3g} FLOPs, objective {p['objective']}"]

    def block(tag, a):
        if not a:
            return
        for method in ("isoflop", "parametric"):
            m = a.get(method)
            if m and m.get("status") == "skipped":
                lines.append(f"  {tag}{method:10s} n/a: {m.get('reason')}")
            elif m:
                lines.append(f"  {tag}{method:10s} N = {m['n']:.4g} {_ci(m['n_ci95'])}   "
                             f"D = {m['d']:.4g} tokens {_ci(m['d_ci95'])}"
                             + ("" if m.get("usable", True) else "   UNUSABLE"))
                for w in m.get("warnings") or []:
                    lines.append(f"  {tag}{'':10s} warning: {w}")

    if p["objective"] == "both":
        s = p["split"]
        rule = s.get("source_rule") or {}
        lines.append(f"  {s['source']} pre-training then {s['target']}, same model (pre-training as in the measured "
                     f"transfer runs: D_{s['source']} = {rule.get('coefficient', float('nan')):.3g}·"
                     f"N^{rule.get('exponent', float('nan')):.3f} tokens):")
        lines.append(f"    N = {s['n']:.4g} {_ci(s.get('n_ci95'))}" + ("" if s.get("usable", True) else "   UNUSABLE"))
        for w in s.get("warnings") or []:
            lines.append(f"    warning: {w}")
        lines.append(f"    {s['source']}: {100 * s['source_fraction']:.0f}% of C "
                     f"{_ci(s.get('source_fraction_ci95'), '{:.2f}')} = {s['source_flops']:.3g} FLOPs, "
                     f"{s['source_tokens']:.4g} tokens")
        lines.append(f"    {s['target']}: {s['target_flops']:.3g} FLOPs, {s['target_tokens']:.4g} tokens")
        verdict = "pre-training pays" if s.get("transfer_pays") else "training from scratch is better"
        lines.append(f"    predicted {s['target']} loss {s['loss']:.4f}; from scratch at the same C: "
                     f"{s['scratch_loss']:.4f} at N = {s.get('scratch_n', float('nan')):.4g} ({verdict}; loss gain 95% "
                     f"{_ci(s.get('loss_gain_ci95'), '{:.4f}')})")
        lines.append(f"  {s['target']} alone at C:")
        block("  ", p.get("target_alone"))
    else:
        block("", p)
    lines.append("  (95% intervals: hull of run-level and budget-blocked bootstrap)")
    shown = {w for k in ("isoflop", "parametric") for w in ((p.get(k) or {}).get("warnings") or [])}
    for a in (p.get("split"), p.get("target_alone")):
        shown |= {w for w in ((a or {}).get("warnings") or [])}
        shown |= {w for k in ("isoflop", "parametric") for w in (((a or {}).get(k) or {}).get("warnings") or [])}
    for w in p.get("warnings") or []:
        if w.split(": ", 1)[-1] not in shown and w not in shown:
            lines.append(f"  warning: {w}")
    if not p.get("usable", True):
        lines.append(f"  no usable answer: every law above is flagged UNUSABLE (exit status {trust.EXIT_UNUSABLE})")
    return "\n".join(lines)
