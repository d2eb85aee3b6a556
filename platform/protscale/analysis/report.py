"""The fit report: Markdown (``report.md``) and the same content as standalone HTML (``report.html``)."""

from __future__ import annotations

import html
import re
from pathlib import Path


def _g(v, fmt="{:.4g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _f(v, spec: str) -> str:
    """``format(v, spec)``, or "n/a" for a value that could not be computed (None in results.json)."""
    return "n/a" if v is None else format(v, spec)


def _ci(iv, fmt="{:.3f}") -> str:
    return "n/a" if not iv else f"[{fmt.format(iv[0])}, {fmt.format(iv[1])}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _warnings(law: dict) -> list[str]:
    """A law's warnings (results.json ``warnings``), flagged when they make it unusable."""
    ws = law.get("warnings") or []
    if not ws:
        return []
    head = ("**Warnings — unusable for allocation:**" if law.get("unusable") else "**Warnings:**")
    return [head, ""] + [f"- {w}" for w in ws] + [""]


def build_markdown(results: dict, plots: list[Path]) -> str:
    L: list[str] = ["# protscale scaling-law fit", ""]
    L.append(f"Experiments: {', '.join(results.get('experiments') or ['(in memory)'])}; "
             f"store: `{results.get('tracking_uri')}`; results schema v{results['schema_version']}.")
    cfg = results.get("config", {})
    L.append(f"Metric `{cfg.get('metric')}`; bootstrap: {cfg.get('n_boot')} replicates per scheme "
             f"({cfg.get('n_boot_parametric')} for the parametric law), seed {cfg.get('seed')}. Intervals are 95% "
             "percentile intervals; the one reported is the hull of the run-level and the budget-blocked "
             "bootstrap (for the transfer law a wild cluster bootstrap widened for few runs: see `transfer.py`).")
    cal = results.get("calibration")
    if cal:
        L.append("Calibration these intervals rest on (share of nominal-95% intervals containing the truth over "
                 "synthetic sweeps from a known law; `" + cal["command"] + "`): "
                 + "; ".join(f"{q['quantity']} {100 * q['observed']:.1f}% (median width {q['median_width']:.3g}, "
                             f"{q['simulations']} sweeps)" for q in cal["quantities"]) + ".")
    ub = results.get("unigram_baseline")
    if ub:
        L.append(f"Unigram baseline (loss of predicting each residue from its frequency alone): {ub['nats']:.3f} nats "
                 f"({ub['source']}); losses within {100 * ub['margin']:.0f}% of it are flagged.")
    L.append("")
    if results.get("notes"):
        L += ["## Summary", ""]
        L += [f"- {n}" for n in results["notes"]]
        L.append("")
    ck = results.get("checks") or {}
    L += ["## Data checks", "",
          f"{ck.get('n_runs_in', 0)} trial run(s) read, {ck.get('n_runs_clean', 0)} passed the checks."]
    exc = ck.get("excluded_by_check") or {}
    if exc:
        L.append("Excluded: " + ", ".join(f"{k}: {v}" for k, v in sorted(exc.items())) + ".")
    L.append("")
    for it in ck.get("issues", []):
        if it["severity"] in ("excluded", "warning"):
            L.append(f"- **{it['check']}** ({it['severity']}): {it['message']}")
    infos = [it for it in ck.get("issues", []) if it["severity"] == "info"]
    if infos:
        L.append(f"- {len(infos)} informational note(s) (importer defects, derived axes) are listed in "
                 "`results.json` → `checks.issues`.")
    L.append("")
    for obj, r in results["objectives"].items():
        L += [f"## {obj.upper()}", "",
              f"{r['n_runs']} clean run(s): {r['n_scratch_runs']} from scratch, {r['n_transfer_runs']} initialised "
              "from another run.", ""]
        iso = r.get("isoflop") or {}
        L += ["### IsoFLOP frontier", ""]
        if "n_exponent" in iso:
            L.append(f"**N_opt ∝ C^{iso['n_exponent']:.3f}**, 95% interval {_ci(iso['n_exponent_ci95'])} "
                     f"(run-level {_ci(iso['n_exponent_ci95_run'])}, budget-blocked "
                     f"{_ci(iso['n_exponent_ci95_budget'])}); "
                     f"**D_opt ∝ C^{iso['d_exponent']:.3f}** {_ci(iso['d_exponent_ci95'])}. "
                     f"N_opt = {iso['n_coefficient']:.4g}·C^{iso['n_exponent']:.4f}.")
            L.append("")
            rows = [[f"{b['budget']:.3g}", b["n_runs"], b["n_sizes"], "yes" if b["used"] else "no",
                     _g(b["n_opt"]), _ci(b.get("n_opt_ci95_run"), "{:.3g}"), _g(b["d_opt"]), _g(b["loss_opt"])]
                    for b in iso["budgets"]]
            L += _table(["budget C", "runs", "sizes", "used", "N_opt", "N_opt 95% (run-level)", "D_opt",
                         "loss at N_opt"], rows)
            for d in iso.get("dropped_budgets", []):
                L.append(f"- budget {d['budget']:.3g} left out: {d['reason']}")
            L.append("")
            L += _warnings(iso)
            L += _grid_advice(iso)
        else:
            L += [f"**Not fitted.** {iso.get('reason')}", ""]
            L += _warnings(iso)
            L += _empirical_table(iso)
            for d in iso.get("dropped_budgets", []):
                L.append(f"- budget {d['budget']:.3g}: {d['reason']}")
            if iso.get("dropped_budgets"):
                L.append("")
            L += _grid_advice(iso)
        env = r.get("envelope") or {}
        L += ["### Envelope L(C)", ""]
        if "b" in env:
            L += [f"L(C) = {_f(env['a'], '.4g')}·C^{_f(env['b'], '.5f')}, exponent 95% {_ci(env['b_ci95'], '{:.5f}')} "
                  f"over C in [{env['compute_range'][0]:.3g}, {env['compute_range'][1]:.3g}] ({env['n_runs']} runs).", ""]
            L += _warnings(env)
        else:
            L += [f"Not fitted: {env.get('reason')}", ""]
        par = r.get("parametric") or {}
        L += ["### Parametric law L(N, D) = E + A/N^α + B/D^β", ""]
        if "best" in par:
            b = par["best"]
            if par.get("degenerate"):
                L += [f"**Warning**: {par.get('degenerate_reason') or par.get('reason')}.", ""]
            L += _warnings(par)
            L.append(f"Points: {par['points']} ({par['n_points']}); Huber δ = {par['huber_delta']} summed over "
                     f"log-sum-exp residuals; L-BFGS from {par['n_starts']} grid starts.")
            L.append("")
            L.append(f"**Global optimum**: E = {_f(b['E'], '.4f')}, A = {_f(b['A'], '.5g')}, B = {_f(b['B'], '.6g')}, "
                     f"α = {_f(b['alpha'], '.4f')} {_ci(par.get('alpha_ci95'))}, β = {_f(b['beta'], '.4f')} "
                     f"{_ci(par.get('beta_ci95'))}; objective {_f(par['objective_value'], '.6g')}; "
                     f"rmse(log L) {_f(par['rmse_log'], '.4f')}.")
            if par.get("allocation_exponent") is not None:
                L.append(f"**Allocation exponent** β/(α+β) = {par['allocation_exponent']:.3f}, 95% "
                         f"{_ci(par['allocation_exponent_ci95'])} (N_opt ∝ C^{{β/(α+β)}}).")
            else:
                L.append("**Allocation exponent** β/(α+β): n/a (the law has no compute-optimal size).")
            L.append("")
            L.append(f"Basins with an objective within {100 * par['basin_rel_tol']:.0f}% of the optimum:")
            L.append("")
            rows = [[k + 1, _f(x['E'], '.4f'), _f(x['A'], '.5g'), _f(x['B'], '.6g'), _f(x['alpha'], '.4f'),
                     _f(x['beta'], '.4f'), _f(x.get('allocation_exponent'), '.3f'), _f(x['objective'], '.6g'),
                     x["n_starts"]]
                    for k, x in enumerate(par["basins"])]
            L += _table(["#", "E", "A", "B", "α", "β", "β/(α+β)", "objective", "grid starts"], rows)
            L += _basin_spread(par)
            fi = par.get("from_init")
            if fi:
                i, s, c = fi["init"], fi["scipy_default"], fi["converged"]
                L.append(f"**From the given initial point** [E, A, B, α, β] = [{i['E']:.4g}, {i['A']:.4g}, "
                         f"{i['B']:.4g}, {i['alpha']:.3g}, {i['beta']:.3g}]:")
                L.append("")
                L += _table(["run", "E", "A", "B", "α", "β", "β/(α+β)", "objective", "note"], [
                    ["SciPy L-BFGS-B, default tolerances", _f(s['E'], '.4f'), _f(s['A'], '.5g'), _f(s['B'], '.6g'),
                     _f(s['alpha'], '.4f'), _f(s['beta'], '.4f'), _f(s.get('allocation_exponent'), '.3f'),
                     _f(s['objective'], '.6g'),
                     f"stopped after {s['iterations']} iterations, max |gradient| {_f(s['max_abs_gradient'], '.2g')}"],
                    ["same start, to convergence", _f(c['E'], '.4f'), _f(c['A'], '.5g'), _f(c['B'], '.6g'),
                     _f(c['alpha'], '.4f'), _f(c['beta'], '.4f'), _f(c.get('allocation_exponent'), '.3f'),
                     _f(c['objective'], '.6g'), ""]])
                if (s["objective"] is not None and par["objective_value"]
                        and s["objective"] > par["objective_value"] * (1 + par["basin_rel_tol"])):
                    L.append(f"The default-tolerance run from this point stops where the objective is "
                             f"{100 * (s['objective'] / par['objective_value'] - 1):.0f}% above the global optimum: "
                             "a point on a flat slope, not a minimum.")
                    L.append("")
        else:
            L += [f"Not fitted: {par.get('reason')}", ""]
        tr = r.get("transfer")
        if tr:
            L += ["### Transfer", ""]
            if "k" in tr:
                L.append(f"Effectively transferred tokens (source: {', '.join(tr['source_objectives']) or '?'}): "
                         f"**D_t = {_f(tr['k'], '.4g')}·D_F^{_f(tr['a'], '.3f')}·"
                         f"N^{_f(tr['b'] if tr['b'] is not None else 0, '.3f')}**; "
                         f"a 95% {_ci(tr['a_ci95'])}, b 95% {_ci(tr['b_ci95'])}; {tr['n_points']} points from "
                         f"{tr['n_runs']} runs; rmse(log D_t) {_f(tr['rmse_log'], '.3f')}.")
                sr = tr.get("source_rule")
                if sr:
                    L.append(f"Sources of the measured runs: D_source = {sr['coefficient']:.3g}·N^{sr['exponent']:.3f} "
                             f"tokens ({sr['n_runs']} runs); the law holds for sources trained that way.")
                if tr.get("efficiency") is not None:
                    L.append(f"Transfer efficiency η (target tokens earned per pre-training token, at each run's last "
                             f"point where D_t is defined; median over runs) = {tr['efficiency']:.3f} "
                             f"{_ci(tr.get('efficiency_ci95'))} (a description of the runs, not used by the allocation).")
            else:
                L.append(f"Not fitted: {tr.get('reason')}")
            L.append("")
            L += _warnings(tr)
            rows = [[p["run_id"][:8], p["scratch_run_id"][:8], f"{p['n_params']:.3g}", _g(p["budget_flops"], "{:.3g}"),
                     _g(p["init_budget_flops"], "{:.3g}"), p["n_points"], p["n_beyond_scratch"], p["n_no_benefit"],
                     _g(p.get("efficiency"), "{:.3f}")]
                    for p in tr.get("pairs", [])]
            L += _table(["run", "scratch", "N", "budget", "source budget", "points", "beyond scratch", "no benefit",
                         "η"], rows)
            for n in tr.get("notes", []):
                L.append(f"- {n}")
            L.append("")
        L += _repetition(r.get("repetition"))
        al = r.get("allocation") or []
        if al:
            L += ["### Compute-optimal allocation", ""]
            rows = []
            for a in al:
                i, p = a.get("isoflop", {}), a.get("parametric", {})
                rows.append([f"{a['budget_flops']:.0e}", _g(i.get("n"), "{:.3g}"), _ci(i.get("n_ci95"), "{:.3g}"),
                             _g(i.get("d"), "{:.3g}"), _g(p.get("n"), "{:.3g}"), _ci(p.get("n_ci95"), "{:.3g}"),
                             _g(p.get("d"), "{:.3g}")])
            L += _table(["C", "N (IsoFLOP)", "95%", "D (IsoFLOP)", "N (parametric)", "95%", "D (parametric)"], rows)
            why = next((a["parametric"]["reason"] for a in al
                        if (a.get("parametric") or {}).get("status") == "skipped"), None)
            if why:
                L += [f"Parametric columns n/a: {why}.", ""]
            elif par.get("status") == "warning" and any("n" in (a.get("parametric") or {}) for a in al):
                L += [f"Parametric columns: mind the warning on the parametric law above ({par.get('reason')}).", ""]
    for t in results.get("allocation") or []:
        if t.get("status") == "skipped":
            L += [f"## Allocation: {t['source'].upper()} pre-training → {t['target'].upper()}", "",
                  f"Not computed: {t.get('reason')}.", ""]
            continue
        L += [f"## Allocation: {t['source'].upper()} pre-training → {t['target'].upper()}", "",
              "Model of the split (`protscale.analysis.allocation`): a model of size N is pre-trained the way the "
              "measured transfer runs' sources were (source rule below), the rest of the budget trains the target, "
              "and the target counts as a scratch run on D_F + D_t tokens (the transfer law, uncapped); N minimises "
              "the target's parametric law. The last columns compare with the target trained from scratch.", ""]
        rule = (t["table"][0].get("source_rule") if t["table"] else None) or {}
        if rule:
            L += [f"Source rule: D_source = {rule['coefficient']:.3g}·N^{rule['exponent']:.3f} tokens, from "
                  f"{rule['n_runs']} transfer run(s) with N in [{rule['n_range'][0]:.3g}, {rule['n_range'][1]:.3g}].", ""]
        rows = [[f"{a['budget_flops']:.0e}", f"{a['n']:.3g}", _ci(a.get("n_ci95"), "{:.3g}"),
                 f"{a['source_fraction']:.2f}", _ci(a.get("source_fraction_ci95"), "{:.2f}"),
                 f"{a['source_tokens']:.3g}", f"{a['target_tokens']:.3g}", f"{a['loss']:.4f}", f"{a['scratch_loss']:.4f}",
                 _g(a.get("scratch_n"), "{:.3g}"), _ci(a.get("loss_gain_ci95"), "{:.4f}")]
                for a in t["table"]]
        L += _table(["C", "N", "N 95%", f"{t['source']} fraction", "95%", f"{t['source']} tokens",
                     f"{t['target']} tokens", "loss", "loss from scratch", "N from scratch", "loss gain 95%"], rows)
    if plots:
        L += ["## Plots", ""]
        for p in plots:
            L += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(L) + "\n"


def _repetition(rep: dict | None) -> list[str]:
    if not rep:
        return []
    L = ["### Repeated data (Muennighoff et al. 2023)", "",
         f"Runs on `{rep['dataset']}` ({', '.join(rep['pairs'])}) against runs that saw their data once "
         f"({', '.join(rep.get('fresh_pairs') or [])}); D′ = U + U·R*·(1 − e^(−R/R*)), {rep['n_points']} points, "
         f"rmse(log D′) {_f(rep['rmse_log'], '.3f')}."]
    u = f"U = {rep['unique_tokens']:.3g} unique tokens" + (" (given)" if rep.get("unique_tokens_fixed") else "")
    if rep.get("r_star") is not None:
        L.append(f"**R* = {rep['r_star']:.3g}** 95% {_ci(rep['r_star_ci95'], '{:.3g}')}; {u}: repeating beyond "
                 f"U·(1 + R*) = {rep['saturation_tokens']:.3g} effective tokens buys nothing.")
    else:
        L.append(f"R* not identified: {rep.get('reason')}")
    return L + [""]


def _basin_spread(par: dict) -> list[str]:
    """Where the bootstrap replicates' optima fall: each replicate is refitted from the full grid."""
    sp = par.get("basin_spread")
    if not sp:
        return []
    L = ["Bootstrap replicates, each refitted from the full initialisation grid (pruned to the best starts after "
         "a few iterations): share whose optimum has the (α, β) of each basin above (within 0.02), elsewhere, and "
         "how many distinct basins lie within the basin tolerance of a replicate's own optimum:", ""]
    rows = []
    for scheme, v in sp.items():
        near = ", ".join(f"{k}: {100 * x:.0f}%" for k, x in v["near_optimal_basins"].items())
        rows.append([scheme, ", ".join(f"#{i + 1}: {100 * x:.0f}%" for i, x in enumerate(v["share_by_basin"])) or "n/a",
                     f"{100 * v['share_other']:.0f}%", near])
    return L + _table(["scheme", "in basin", "elsewhere", "near-optimal basins per replicate"], rows)


def _empirical_table(iso: dict) -> list[str]:
    emp = iso.get("empirical_optima") or []
    if not emp:
        return []
    edge = {"smallest": "smallest size sampled: extend the grid towards smaller models",
            "largest": "largest size sampled: extend the grid towards larger models", None: "inside the grid"}
    rows = [[f"{e['budget']:.3g}", e["n_runs"], e["n_sizes"], f"{e['n_min']:.3g} to {e['n_max']:.3g}",
             f"{e['n_best']:.3g}", f"{e['d_best']:.3g}", f"{e['loss_best']:.4f}",
             edge.get(e["edge"], e["edge"]) if e["n_sizes"] >= 2 else "one size only"]
            for e in emp]
    return (["Best run observed per budget (empirical optimum; not a fitted minimum):", ""]
            + _table(["budget C", "runs", "sizes", "N sampled", "best N", "its D", "its loss", "best run is at"], rows))


def _grid_advice(iso: dict) -> list[str]:
    msgs = (iso.get("grid_advice") or {}).get("messages") or []
    if not msgs:
        return []
    return ["**How to extend the sweep:**", ""] + [f"- {m}" for m in msgs] + [""]


def _inline(s: str) -> str:
    s = html.escape(s, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s


def markdown_to_html(md: str, title: str = "protscale fit") -> str:
    """Just enough Markdown for this report: headings, paragraphs, lists, tables, images."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:2px 6px}"
           "img{max-width:100%}code{background:#eee}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            lvl = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{lvl}>{_inline(ln[lvl:].strip())}</h{lvl}>")
        elif ln.startswith("| "):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|-")]
            out.append("<table>")
            for k, r in enumerate(cells):
                tag = "th" if k == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        elif ln.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif (m := re.match(r"!\[(.*?)\]\((.*?)\)", ln)):
            out.append(f"<p><img alt='{html.escape(m.group(1))}' src='{html.escape(m.group(2))}'></p>")
        elif ln.strip():
            out.append(f"<p>{_inline(ln)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(results: dict, plots: list[Path], out: Path) -> tuple[Path, Path]:
    md = build_markdown(results, plots)
    pm, ph = Path(out) / "report.md", Path(out) / "report.html"
    pm.write_text(md)
    ph.write_text(markdown_to_html(md))
    return pm, ph
