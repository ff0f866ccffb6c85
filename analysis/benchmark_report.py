"""The benchmark's numbers, tables and figures (analysis/benchmark.py runs the studies).

``study_details`` reads one study's storage (the winner's σ list, the trials' cost);
``aggregate`` sums up the studies of one testbed and budget over their search seeds;
``markdown`` writes README's results block; ``plot_*`` draw the figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev

# In the FID table's column order: the same-NFE baselines, then the long-step references. A DDPM
# testbed has the karras … karras20 keys, a flow-matching one the flow … flow50 keys
# (config.BASELINES); a table shows the keys its studies ran.
LABELS = {"karras": "Karras DPM++2M", "flow": "flow default Euler", "ays": "AYS",
          "optimalsteps": "OptimalSteps", "gits": "GITS", "oss": "OSS", "paper": "paper preset",
          "karras20": "Karras DPM++2M @20", "flow28": "flow default Euler @28",
          "flow50": "flow default Euler @50"}
# The long-step references a found schedule is measured against, with their short names: Karras
# DPM++2M at 20 steps on a DDPM model; a flow model's default schedule with Euler at its pipelines'
# 28 steps (SD3, FLUX.1-dev) and at diffusers' generic 50.
REFERENCES = {"karras20": "Karras@20", "flow28": "flow@28", "flow50": "flow@50"}


# ---------------------------------------------------------------- one study, from its storage

def _stage_trials(out: Path, name: str) -> tuple[list, list]:
    """(shown number, stage, trial) of every trial of both stages, and the baseline slots."""
    import optuna

    from schedsearch import slots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    main = optuna.load_study(study_name=name, storage=storage)
    trials = [(t.number + offset, 1 if st is main else 2, t)
              for st, offset in slots.stored_stages(storage, main)
              for t in st.get_trials(deepcopy=False)]
    try:
        baselines = optuna.load_study(study_name=f"{name}:baselines",
                                      storage=storage).get_trials(deepcopy=False)
    except KeyError:
        baselines = []
    return trials, baselines, main.user_attrs.get("config") or {}


def _seconds(t) -> float:
    if t.datetime_start is None or t.datetime_complete is None:
        return 0.0
    return (t.datetime_complete - t.datetime_start).total_seconds()


def trial_cost(trials: list, baselines: list) -> dict:
    """Image·model calls and time of the trials, from what each trial stored. A pruned trial
    stored no timing; its calls are the images it reached times its NFE."""
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    calls = model_s = feat_s = complete_s = all_s = 0.0
    for _, _, t in trials:
        state = t.state.name
        if state not in ("COMPLETE", "PRUNED", "FAIL"):
            continue
        all_s += _seconds(t)
        nfe = (t.user_attrs.get("candidate") or {}).get("nfe", 0)
        if state == "COMPLETE":
            res = t.user_attrs["result"]
            counts["complete"] += 1
            calls += res["n"] * res.get("nfe", nfe)
            model_s += res["seconds"].get("model", 0.0)
            feat_s += res["seconds"].get("features", 0.0)
            complete_s += _seconds(t)
        elif state == "PRUNED":
            counts["pruned"] += 1
            calls += max(t.intermediate_values, default=0) * nfe
        else:
            counts["failed"] += 1
    return {**counts, "image_model_calls": calls, "trial_seconds": all_s,
            "complete_trial_seconds": complete_s, "model_seconds": model_s,
            "features_seconds": feat_s,
            "share_model_features": (model_s + feat_s) / complete_s if complete_s else None,
            "baseline_seconds": sum(_seconds(t) for t in baselines)}


def study_details(out: Path, summary: dict) -> dict:
    """The winner (its σ list, solver, family, end, FreeU, stage) and the trials' cost."""
    trials, baselines, config = _stage_trials(out, summary["study"])
    details = {"cost": trial_cost(trials, baselines), "config": config}
    match = [(stage, t) for number, stage, t in trials if number == summary.get("best_trial")]
    if match:
        stage, t = match[0]
        cand = t.user_attrs["candidate"]
        params = cand.get("params") or dict(t.params)
        details["winner"] = {
            "trial": summary["best_trial"], "stage": "local" if stage == 2 else "global",
            "family": params.get("family"), "end": params.get("end"), "solver": cand["solver"],
            "freeu": cand.get("freeu") is not None, "sigmas": cand["sigmas"],
            "warm_start": "warm" in t.user_attrs, "params": params}
    return details


# ---------------------------------------------------------------- over the search seeds

def spread(values: list, *, interval: bool = False) -> dict:
    """Mean and min–max over the study seeds; with ``interval`` (the search's results, not the
    baselines or costs) and two values or more, also the SD and the 95% Student-t interval of the
    mean. That interval is the search's own randomness: the held-out sets and the baselines are
    the same for every seed, so their noise is not in it (the paired CIs carry that)."""
    out = {"mean": mean(values), "min": min(values), "max": max(values), "per_seed": values}
    if interval and len(values) > 1:
        from scipy.stats import t

        sd = stdev(values)
        half = t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
        out.update(sd=sd, ci95=[out["mean"] - half, out["mean"] + half])
    return out


WORSE_RTOL = 1e-6


def _best_same_nfe(rows: dict, budget: int):
    same = [r for k, r in rows.items() if k != "best" and r["nfe"] == budget]
    return min(same, key=lambda r: r["fid_heldout"]) if same else None


def aggregate(budget: int, summaries: list[dict]) -> dict:
    """One testbed and budget over its study seeds: held-out FIDs, the ratios to the best
    same-NFE baseline (by held-out FID) and to the long-step references (``REFERENCES``), the
    paired CIs against that baseline, the winners and the cost."""
    per_seed = [{r["key"]: r for r in s["rows"]} for s in summaries]
    seeds = [s["seed"] for s in summaries]
    found = [rows["best"]["fid_heldout"] for rows in per_seed]
    cfg = summaries[0].get("config") or {}
    out = {"budget": budget, "seeds": seeds, "found": spread(found, interval=True), "baselines": {},
           "search": {**{k: cfg.get(k) for k in ("trials", "refine", "refine_starts",
                                                 "refine_margin", "warm_start", "sampler",
                                                 "pruner")},
                      "winner_choice": summaries[0].get("winner_choice")}}
    for key, r in per_seed[0].items():
        if key != "best" and all(key in rows for rows in per_seed):
            out["baselines"][key] = {"name": r["name"], "nfe": r["nfe"], "solver": r["solver"],
                                     "fid_search": r["fid"], **spread(
                                         [rows[key]["fid_heldout"] for rows in per_seed])}
    bests = [_best_same_nfe(rows, budget) for rows in per_seed]
    if all(bests):
        out["best_same_nfe"] = {"keys": [b["key"] for b in bests],
                                "names": [b["name"] for b in bests]}
        out["found_over_best_same_nfe"] = spread(
            [f / b["fid_heldout"] for f, b in zip(found, bests)], interval=True)
        cis = [dict(b.get("vs_best") or {}, seed=s) for b, s in zip(bests, seeds)]
        out["ci_vs_best_same_nfe"] = {
            "per_seed": cis, "seeds": len(cis),
            "excludes_zero": sum(bool(c.get("excludes_zero")) for c in cis),
            "better": sum(c.get("hi", 0) < 0 for c in cis),
            "worse": sum(c.get("lo", 0) > 0 for c in cis),
            "mean_delta": mean(c["delta"] for c in cis) if all("delta" in c for c in cis) else None}
        # worse by more than float round-off: a winner that is the baseline's own σ list with a
        # solver taking the same steps (DPM++1S vs Euler) differs from it in the 7th digit
        worse = [s for s, f, b in zip(seeds, found, bests)
                 if f > b["fid_heldout"] * (1 + WORSE_RTOL)]
        out["found_worse_than_best_same_nfe"] = {"ever": bool(worse), "seeds": worse}
    for ref in REFERENCES:
        if all(ref in rows for rows in per_seed):
            out[f"found_over_{ref}"] = spread(
                [f / rows[ref]["fid_heldout"] for f, rows in zip(found, per_seed)], interval=True)
    out["winners"] = [winner_row(s, rows) for s, rows in zip(summaries, per_seed)]
    out["cost"] = {k: spread([s["cost"][k] for s in summaries if s["cost"].get(k) is not None])
                   for k in ("image_model_calls", "trial_seconds", "share_model_features",
                             "baseline_seconds", "complete", "pruned", "failed")
                   if any(s["cost"].get(k) is not None for s in summaries)}
    out["cost"]["wall_seconds"] = spread([s["wall_seconds"] for s in summaries])
    out["cost"]["resumed"] = sum(s.get("invocations", 1) > 1 for s in summaries)
    rescored = [s["rescore_seconds"] for s in summaries if s.get("rescore_seconds") is not None]
    if rescored:   # the winner picked again by newer code: that pass's own time
        out["cost"]["rescore_seconds"] = spread(rescored)
    return out


def winner_row(summary: dict, rows: dict) -> dict:
    w = dict(summary.get("winner") or {})
    w.update(seed=summary["seed"], fid_search=rows["best"]["fid"],
             fid_heldout=rows["best"]["fid_heldout"], recommended=summary.get("recommended"))
    return w


# ---------------------------------------------------------------- markdown

def _g(x) -> str:
    # '#' keeps trailing zeros: 7.0004 prints as 7.000, not as a bare 7 beside 6.813
    return "n/a" if x is None else f"{x:#.4g}"


def _spread_text(s: dict, fmt=_g) -> str:
    if s["min"] == s["max"]:
        return fmt(s["mean"])
    return f"{fmt(s['mean'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def _ratio(x) -> str:
    return f"{x:.3f}"


def _ci95_text(s: dict) -> str:
    return f"{s['ci95'][0]:.3f}–{s['ci95'][1]:.3f}" if "ci95" in s else "—"


def _sigmas(sig: list) -> str:
    return ", ".join("0" if s == 0 else f"{s:.3g}" for s in sig)


def _search_text(budgets: list) -> str:
    from schedsearch.config import StudyConfig

    s = budgets[0].get("search") or {}
    if not all((b.get("search") or {}).get("trials") for b in budgets):
        return "the study defaults"
    # each budget's split as its study made it (StudyConfig.stages, not a copy of the rule)
    counts = [(b["budget"], StudyConfig(trials=b["search"]["trials"],
                                        refine=b["search"]["refine"]).stages()) for b in budgets]
    if len({n1 + n2 for _, (n1, n2) in counts}) == 1:
        n1, n2 = counts[0][1]
        split = f"{n1 + n2} trials, {n2} of them in the local (CMA-ES) stage"
    else:
        glob = {n1 for _, (n1, _) in counts}
        split = (f"{', '.join(str(n1 + n2) for _, (n1, n2) in counts)} trials at "
                 f"{', '.join(str(b) for b, _ in counts)} NFE, "
                 + (f"{glob.pop()} in the global stage and the rest in the local (CMA-ES) stage"
                    if len(glob) == 1 else "global / local "
                    + ", ".join(f"{n1} / {n2}" for _, (n1, n2) in counts)))
    starts = s.get("refine_starts") or 1   # studies made before the local stage was split: 1
    # studies made before the margin existed started every second run; say the rule the later
    # ones ran with (docs/search.md, "Why a margin", says which budgets that changed). Studies
    # with a 10% margin ran the rule before it: any family's trial could start a further run.
    margins = {b["budget"]: b["search"].get("refine_margin") for b in budgets
               if b["search"].get("refine_margin") is not None}
    margin = StudyConfig.refine_margin if StudyConfig.refine_margin in margins.values() else \
        next(iter(margins.values()), None)
    if starts > 1:
        free = " free-form" if margin == StudyConfig.refine_margin else ""
        others = (f"the best{free} trial with another solver" if starts == 2
                  else f"the best{free} trials of up to {starts - 1} other solvers")
        within = (f" if its search FID is within {margin * 100:.0f}% of the best's"
                  if margin is not None else "")
        older = sorted(b for b, m in margins.items() if m != margin)
        if older:
            within += (f"; the {', '.join(map(str, older[:-1]))}{' and ' if len(older) > 1 else ''}"
                       f"{older[-1]} NFE studies ran the earlier rule: a trial of any family "
                       f"within {margins[older[0]] * 100:.0f}%")
        split += (f", in up to {starts} CMA-ES runs (around the global stage's best trial and "
                  f"{others}{within})")
    text = (f"{split}, {s['sampler']} in the global stage, warm-started from the "
            f"{s['warm_start']} best same-NFE baselines, {s['pruner']} pruning")
    w = s.get("winner_choice")
    if w:
        text += (f"; the winner is the lowest mean FID on {w['validation_sets']} fresh seed "
                 f"set{'s' * (w['validation_sets'] > 1)} of {w['images_per_set']} images among "
                 f"the {w['rerank']} best trials on the search subset and the best warm start")
    return text


def fid_table(tb: str, data: dict, cfg: dict) -> list[str]:
    budgets = sorted(data["budgets"].values(), key=lambda a: a["budget"])
    keys = [k for k in LABELS if any(k in a["baselines"] for a in budgets)]
    n = len(budgets[0]["seeds"])
    img = cfg["images"][tb]
    lines = [f"#### {tb}: held-out FID by budget and method\n",
             f"FID proxy on {cfg['heldout_sets']} held-out sets of {img['heldout']} images "
             f"(mean over the sets), searched on {img['search']} images. *found*: mean over "
             f"{n} search{'es' if n > 1 else ''} (study seed{'s' if n > 1 else ''} "
             f"{', '.join(map(str, budgets[0]['seeds']))}; min–max in parentheses); the baselines "
             f"do not depend on the search seed. Each search: {_search_text(budgets)}. "
             f"† marks the best "
             f"baseline spending the budget's NFE (by held-out FID).\n",
             "| budget | found | " + " | ".join(LABELS[k] for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for a in budgets:
        best = set((a.get("best_same_nfe") or {}).get("keys", []))
        cells = []
        for k in keys:
            b = a["baselines"].get(k)
            if b is None:
                cells.append("—")
                continue
            note = f" ({b['nfe']} NFE)" if b["nfe"] != a["budget"] and k not in REFERENCES else ""
            cells.append(("†" if k in best else "") + _spread_text(b) + note)
        lines.append(f"| {a['budget']} | {_spread_text(a['found'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def ratio_table(tb: str, data: dict) -> list[str]:
    budgets = sorted(data["budgets"].values(), key=lambda a: a["budget"])
    # the references the studies ran; none (a study without them): DDPM's column, all "—"
    refs = [r for r in REFERENCES if any(f"found_over_{r}" in a for a in budgets)] or ["karras20"]
    lines = [f"#### {tb}: found schedule vs the best same-NFE baseline\n",
             "Ratios of held-out FIDs, mean over the study seeds (min–max). The best same-NFE "
             "baseline is the baseline with the lowest held-out FID among those spending the "
             "budget's NFE. Mean's 95% CI: the Student-t interval of that mean ratio over the "
             "study seeds — how much a mean of this many searches moves with the search's own "
             "randomness (the held-out images are shared, so their noise is not in it). CI: the "
             "paired bootstrap 95% interval of FID(found) − FID(that baseline) on the same "
             "held-out images, one per study.\n",
             "| budget | best same-NFE baseline | found / it | mean's 95% CI | "
             + "".join(f"found / {REFERENCES[r]} | " for r in refs)
             + "CIs excluding 0 (found better / worse) | mean Δ FID | found worse (held-out "
               "mean)? |",
             "|---" * (len(refs) + 7) + "|"]
    for a in budgets:
        if "best_same_nfe" not in a:
            lines.append(f"| {a['budget']} | none | " + " | ".join(["—"] * (len(refs) + 5)) + " |")
            continue
        names = " / ".join(sorted({LABELS.get(k, k) for k in a["best_same_nfe"]["keys"]}))
        ci = a["ci_vs_best_same_nfe"]
        ratios = [a.get(f"found_over_{r}") for r in refs]
        worse = a["found_worse_than_best_same_nfe"]
        delta = "n/a" if ci["mean_delta"] is None else f"{ci['mean_delta']:+#.4g}"
        lines.append(
            f"| {a['budget']} | {names} | {_spread_text(a['found_over_best_same_nfe'], _ratio)} | "
            f"{_ci95_text(a['found_over_best_same_nfe'])} | "
            + "".join(f"{_spread_text(x, _ratio) if x else '—'} | " for x in ratios)
            + f"{ci['excludes_zero']} of "
            f"{ci['seeds']} ({ci['better']} / {ci['worse']}) | "
            f"{delta} | "
            f"{'yes, seed ' + ', '.join(map(str, worse['seeds'])) if worse['ever'] else 'no'} |")
    return lines + [""]


def _ci_text(ci: dict) -> str:
    if "delta" not in ci:
        return "—"
    if ci["delta"] == ci["lo"] == ci["hi"] == 0:
        return "0 (the same images)"
    text = f"{ci['delta']:+#.4g} [{ci['lo']:+#.4g}, {ci['hi']:+#.4g}]"
    return f"**{text}**" if ci.get("excludes_zero") else text


def winners_table(tb: str, data: dict) -> list[str]:
    lines = [f"#### {tb}: the found schedules\n",
             "One row per study. Δ: FID(found) − FID(best same-NFE baseline) on the held-out "
             "sets with its paired 95% CI, **bold** when it excludes 0. ★: what `schedsearch run` "
             "recommends (the winner, unless the best same-NFE baseline on the search subset does "
             "as well on the validation seeds).\n",
             "| budget | seed | trial (stage) | family · end | solver | FreeU | σ list | FID held-out "
             "| Δ vs best same-NFE baseline | ★ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in sorted(data["budgets"].values(), key=lambda a: a["budget"]):
        cis = {c["seed"]: c for c in (a.get("ci_vs_best_same_nfe") or {}).get("per_seed", [])}
        for w in a["winners"]:
            warm = ", warm start" if w.get("warm_start") else ""
            rec = w.get("recommended")
            star = "found" if rec == "best" else LABELS.get(rec, rec or "—")
            lines.append(
                f"| {a['budget']} | {w['seed']} | {w.get('trial', '?')} ({w.get('stage', '?')}"
                f"{warm}) | {w.get('family')} · {w.get('end')} | {w.get('solver')} | "
                f"{'on' if w.get('freeu') else 'off'} | {_sigmas(w.get('sigmas') or [])} | "
                f"{_g(w['fid_heldout'])} | {_ci_text(cis.get(w['seed'], {}))} | {star} |")
    return lines + [""]


def cost_table(tb: str, data: dict, cfg: dict) -> list[str]:
    lines = [f"#### {tb}: search cost\n",
             "Per study, mean over the study seeds (min–max). Wall time: the whole study "
             "(baselines, trials, held-out re-scoring, report). Trial time: the trials' durations "
             "in the study storage; image·model calls: images × NFE of every trial (a pruned "
             "trial up to where it stopped); model + features: the share of the completed "
             "trials' time spent in model calls and feature extraction (each trial's stored "
             "seconds).\n",
             "| budget | study wall time (s) | baselines (s) | trials: complete / pruned / failed "
             "| trial time (s) | image·model calls in trials | model + features |",
             "|---|---|---|---|---|---|---|"]
    resumed = 0
    for a in sorted(data["budgets"].values(), key=lambda a: a["budget"]):
        c = a["cost"]
        resumed += c["resumed"]
        pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
        counts = " / ".join(f"{c[k]['mean']:.3g}" for k in ("complete", "pruned", "failed"))
        lines.append(
            f"| {a['budget']} | {_spread_text(c['wall_seconds'], lambda v: f'{v:.0f}')} | "
            f"{c['baseline_seconds']['mean']:.1f} | {counts} | "
            f"{_spread_text(c['trial_seconds'], lambda v: f'{v:.0f}')} | "
            f"{c['image_model_calls']['mean']:,.0f} | "
            f"{_spread_text(c['share_model_features'], pct) if 'share_model_features' in c else 'n/a'} |")
    rescored = [a for a in data["budgets"].values() if "rescore_seconds" in a["cost"]]
    if rescored:
        per = ", ".join(f"{a['cost']['rescore_seconds']['mean']:.0f} s at {a['budget']} NFE"
                        for a in sorted(rescored, key=lambda a: a["budget"]))
        lines.append(f"\nThe winners were picked again by newer code without re-running a "
                     f"trial (`--rescore`): re-scoring the contenders on the validation sets "
                     f"and a new winner on the held-out sets took, per study, {per}; the wall "
                     f"times above are the original studies'.")
    if resumed:
        lines.append(f"\n{resumed} {'study was' if resumed == 1 else 'studies were'} resumed "
                     f"after an interruption: wall time is the sum of the runs' (a killed run's "
                     f"time is lost).")
    return lines + [""] + distill_lines(data["distill_cost"])


def distill_lines(dc: dict) -> list[str]:
    lines = [f"GITS and OSS's own cost at budget {dc['budget']}, measured apart from the study:\n",
             "| method | image·model calls | wall time (s) | time outside model calls |",
             "|---|---|---|---|"]
    t = dc["teacher"]
    lines.append(f"| teacher ({dc['teacher_steps']} steps × {dc['samples']} samples) | "
                 f"{t['image_model_calls']} | {t['wall_seconds']:.2f} | "
                 f"{100 * (1 - t['model_seconds'] / t['wall_seconds']):.0f}% |")
    for k in ("gits", "oss"):
        share = dc[k]["share_outside_model"]
        lines.append(f"| {k.upper()} (after the teacher) | {dc[k]['image_model_calls']} | "
                     f"{dc[k]['wall_seconds']:.2f} | "
                     f"{'n/a (no model calls)' if share is None else f'{100 * share:.0f}%'} |")
    return lines + [""]


def markdown(results: dict, figures: str = "analysis/results") -> str:
    """README's results block: per testbed the held-out FID table, the ratios and CIs, the
    winners, the σ-list and FID-vs-NFE figures and the search cost."""
    cfg, lines = results["config"], []
    for tb, data in results["testbeds"].items():
        lines += fid_table(tb, data, cfg)
        lines += ratio_table(tb, data)
        lines += winners_table(tb, data)
        lines.append(f"![σ lists of the found schedules on {tb}]({figures}/winners_sigmas_{tb}.png)"
                     f"\n")
        lines.append(f"![FID vs NFE on {tb}]({figures}/fid_vs_nfe_{tb}.png)\n")
        lines += cost_table(tb, data, cfg)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- figures

# marker, colour, size, legend label; the curve's own sampler at the budget (karras, flow) in the
# curve's grey, hollow (plot_fid_vs_nfe). Karras@20 is not marked (the curve passes through it at
# 20); flow@28 and @50 are, as the flow testbeds' references (28 is no step count of the curve).
MARKS = {"karras": ("o", "0.3", 7, "Karras DPM++2M at the budget"),
         "flow": ("o", "0.3", 7, "flow default Euler at the budget"),
         "paper": ("s", "tab:blue", 7, "paper preset"), "ays": ("^", "tab:green", 7, "AYS"),
         "optimalsteps": ("^", "tab:green", 7, "OptimalSteps"),
         "flow28": ("P", "tab:brown", 8, "flow default Euler @28"),
         "flow50": ("X", "tab:brown", 8, "flow default Euler @50"),
         "gits": ("v", "tab:purple", 7, "GITS"), "oss": ("D", "tab:orange", 6, "OSS")}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_fid_vs_nfe(tb: str, curve: list[dict], reference: str, budgets: dict, path: Path) -> None:
    """The reference sampler's held-out FID against NFE (``reference``: the baseline key it runs,
    karras or flow), every baseline at its NFE, and the found schedules (mean over the study
    seeds, min–max as error bars)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 4.4))
    ax = fig.add_subplot()
    ax.plot([r["nfe"] for r in curve], [r["fid_heldout"] for r in curve], "-", color="0.3",
            label=f"{LABELS[reference]} (curve)")
    seen = set()
    for a in sorted(budgets.values(), key=lambda a: a["budget"]):
        for key, b in a["baselines"].items():
            if key in MARKS:
                m, c, s, label = MARKS[key]
                ax.plot(b["nfe"], b["mean"], m, color=c, ms=s, zorder=3,
                        mfc="none" if key == reference else c, label=None if key in seen else label)
                seen.add(key)
        f = a["found"]
        ax.errorbar(a["budget"], f["mean"], yerr=[[f["mean"] - f["min"]], [f["max"] - f["mean"]]],
                    fmt="*", color="tab:red", ms=13, capsize=4, alpha=0.8, zorder=2,
                    label=None if "found" in seen else "found (mean, min–max over seeds)")
        seen.add("found")
    nfes = sorted({r["nfe"] for r in curve} | {a["budget"] for a in budgets.values()})
    ax.set_xscale("log")
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("model calls per image (NFE)")
    ax.set_ylabel("FID proxy, held-out (lower is better)")
    ax.set_title(f"{tb}: FID vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_sigmas(tb: str, budgets: dict, path: Path) -> None:
    """The winners' σ lists: σ against step on a log scale, one line per budget and seed,
    one colour per budget; a final σ = 0 is drawn on the floor line."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 4.4))
    ax = fig.add_subplot()
    winners = [(a["budget"], w) for a in budgets.values() for w in a["winners"] if w.get("sigmas")]
    positive = [s for _, w in winners for s in w["sigmas"] if s > 0] or [1.0]
    floor = min(positive) / 3
    styles = ["-", "--", ":", "-."]
    order, labelled = sorted({b for b, _ in winners}), set()
    for budget, w in sorted(winners, key=lambda bw: (bw[0], bw[1]["seed"])):
        colour = f"C{order.index(budget) % 10}"
        shown = [s if s > 0 else floor for s in w["sigmas"]]
        ax.plot(range(len(shown)), shown, styles[w["seed"] % len(styles)], marker="o", ms=3.5,
                color=colour, lw=1.4, alpha=0.85,
                label=None if budget in labelled else f"{budget} NFE")
        labelled.add(budget)
    ax.axhline(floor, color="0.5", lw=0.8, ls=":")
    ax.text(0, floor * 1.15, "σ = 0", fontsize=8, color="0.4")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("σ")
    ax.set_title(f"{tb}: the found σ lists (line style: study seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
