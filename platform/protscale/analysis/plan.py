"""``protscale plan``: the compute-optimal model size and tokens for a budget, from a results.json."""

from __future__ import annotations

from protscale.cli import UserError

from . import allocation


def _ci(iv, fmt="{:.3g}") -> str:
    return "n/a" if not iv else f"[{fmt.format(iv[0])}, {fmt.format(iv[1])}]"


def plan(results: dict, budget_flops: float, objective: str) -> dict:
    """Answer for ``objective`` in {"clm", "mlm", ...} or "both" (source pre-training then target)."""
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
                             f"D = {m['d']:.4g} tokens {_ci(m['d_ci95'])}")

    if p["objective"] == "both":
        s = p["split"]
        lines.append(f"  {s['source']} pre-training then {s['target']}, same model:")
        lines.append(f"    N = {s['n']:.4g} {_ci(s.get('n_ci95'))}")
        lines.append(f"    {s['source']}: {100 * s['source_fraction']:.0f}% of C "
                     f"{_ci(s.get('source_fraction_ci95'), '{:.2f}')} = {s['source_flops']:.3g} FLOPs, "
                     f"{s['source_tokens']:.4g} tokens")
        lines.append(f"    {s['target']}: {s['target_flops']:.3g} FLOPs, {s['target_tokens']:.4g} tokens")
        lines.append(f"    predicted {s['target']} loss {s['loss']:.4f} (from scratch at the same C: "
                     f"{s['scratch_loss']:.4f})")
        lines.append(f"  {s['target']} alone at C:")
        block("  ", p.get("target_alone"))
    else:
        block("", p)
    lines.append("  (95% intervals: hull of run-level and budget-blocked bootstrap)")
    return "\n".join(lines)
