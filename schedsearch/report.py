"""The end of a study: the winner and every baseline re-scored on held-out prompts and seeds, the
recommendation, the comparison table, ``summary.json``, the study's MLflow run, and the preset.

``recommend(rows)`` is a pure function of the comparison rows; everything else reads the study's
storage, so any worker — or a resumed one — writes the same report.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import optuna

from . import files, presets, slots
from .config import ALL_BASELINES
from .freeu import FreeUPlan
from .presets import Preset
from .tracking import ROLE, Tracker


def result_json(res) -> dict:
    """The stored form of a score: FID, KID, n, FID by subset size, NFE, seconds (CLIP)."""
    d = res.as_dict()
    return {k: d[k] for k in ("fid", "kid", "n", "fid_at", "nfe", "seconds", "clip") if k in d}


def stored_preset(d: dict, family: str = "any") -> Preset:
    """A preset from what a study stored: a preset's JSON, a baseline result holding one, or the
    flat record studies of schedsearch 0.1.0 stored (name, sigmas, solver, freeu, guidance,
    schedule)."""
    if "preset" in d:
        return Preset.from_json(d["preset"], origin="stored study")
    if "schema" in d:
        return Preset.from_json(d, origin="stored study")
    return Preset(name=d["name"], family=family, sigmas=d["sigmas"], solver=d["solver"],
                  freeu=FreeUPlan.from_json(d["freeu"]) if d.get("freeu") else None,
                  guidance=d["guidance"], schedule=d.get("schedule"))


def collect_baselines(studies: slots.Studies, family: str = "any") -> dict:
    """key → {"preset": Preset, "fid", "kid", ...} of every baseline that was scored, in the
    order of ``ALL_BASELINES``."""
    out = {}
    for t in slots.trials_of(studies.baselines, slots.COMPLETE):
        for key, r in t.user_attrs.get("results", {}).items():
            out[key] = {**{k: v for k, v in r.items() if k != "preset"},
                        "preset": stored_preset(r, family)}
    order = {k: i for i, k in enumerate(ALL_BASELINES)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 99)))


def heldout(study: optuna.Study, ctx, attr: str, preset: Preset) -> dict:
    """The held-out score of ``preset``, computed once per study and kept in its storage."""
    stored = study.user_attrs.get(attr)
    if stored is None:
        res = ctx.score(preset, which="heldout")
        stored = {"fid": res.fid, "kid": res.kid, "n": res.n}
        study.set_user_attr(attr, stored)
    return stored


def recommend(rows: list[dict]) -> dict:
    """The row to use: the searched winner (key "best"), unless a row spending the same NFE
    scored better on the search subset. Chosen on the search subset, never on held-out, so the
    held-out column stays an honest check; the user never gets a preset that loses to a known
    schedule."""
    best = next(r for r in rows if r["key"] == "best")
    same_nfe = [r for r in rows if r["key"] == "best" or r["nfe"] == best["nfe"]]
    return min(same_nfe, key=lambda r: r["fid"])


def comparison_markdown(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["key"] == "karras"), None)
    head = "| schedule | NFE | solver | FID (search) | FID (held-out) | KID (held-out) |"
    if ref:
        head += " held-out vs Karras@budget |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {'★ ' if r.get('recommended') else ''}{r['name']} | {r['nfe']} | "
                f"{r['solver']} | {r['fid']:.3f} | {r['fid_heldout']:.3f} | "
                f"{r['kid_heldout']:.4f} |")
        if ref:
            line += f" {r['fid_heldout'] / ref['fid_heldout']:.2f}× |"
        lines.append(line)
    return "\n".join(lines)


def _row(key: str, preset: Preset, fid: float, held: dict) -> dict:
    return {"name": preset.name, "key": key, "nfe": preset.nfe, "fid": fid,
            "fid_heldout": held["fid"], "kid_heldout": held["kid"], "solver": preset.solver}


def comparison(studies: slots.Studies, ctx, best: optuna.trial.FrozenTrial) -> tuple[list, dict]:
    """The rows (winner first, then every baseline) with search and held-out scores, and the
    presets they stand for."""
    study = studies.trials
    winner = stored_preset(best.user_attrs["candidate"], ctx.family)
    winner = winner.replace(name=f"best (trial {best.number})")
    chosen = {"best": winner}
    rows = [_row("best", winner, best.values[0],
                 heldout(study, ctx, f"heldout:trial{best.number}", winner))]
    for key, b in collect_baselines(studies, ctx.family).items():
        chosen[key] = b["preset"]
        rows.append(_row(key, b["preset"], b["fid"],
                         heldout(study, ctx, f"heldout:{key}", b["preset"])))
    return rows, chosen


def export_preset(pick: dict, preset: Preset, best, ctx, opts, name: str) -> dict:
    """Write the recommended preset next to the study and, by name, to the user preset folder;
    returns the paths written."""
    scores = {"fid_search": pick["fid"], "fid_heldout": pick["fid_heldout"],
              "kid_heldout": pick["kid_heldout"]}
    origin = ({"trial": best.number, "params": best.params} if pick["key"] == "best" else
              {"baseline": pick["key"], "best_trial": best.number,
               "note": "a baseline beat every searched schedule at this NFE on the search subset"})
    prov = {**ctx.provenance(), "study": name, **origin, "scores": scores}
    preset = preset.replace(name=name, provenance=prov)
    written = {"preset": str(preset.save(Path(opts.out) / f"{name}.preset.json"))}
    if opts.export_user_preset:
        written["user_preset"] = str(preset.save(presets.user_dir() / f"{name}.json"))
    return written


def finalize(studies: slots.Studies, ctx, tracker: Tracker, parent: str, opts, name: str,
             echo) -> dict:
    """Compare, recommend, export and log; returns the study's summary."""
    config, study = ctx.config, studies.trials
    multi = len(config.objectives) > 1
    complete = slots.trials_of(study, slots.COMPLETE)
    summary = {"study": name, "budget": config.budget, "trials": slots.counts(study),
               "model": config.model, "out": str(opts.out), "rows": []}
    if not complete:
        echo("no trial completed yet; nothing to compare")
        return summary
    best = min(study.best_trials if multi else [study.best_trial], key=lambda t: t.values[0])
    rows, chosen = comparison(studies, ctx, best)
    summary.update(rows=rows, best_trial=best.number, best_params=best.params)
    if multi:
        summary["pareto_front"] = [{"trial": t.number, "values": t.values, "params": t.params}
                                   for t in study.best_trials]
    pick = recommend(rows)
    pick["recommended"] = True
    summary["recommended"] = pick["key"]
    summary.update(export_preset(pick, chosen[pick["key"]], best, ctx, opts, name))
    log_study_run(tracker, parent, summary, rows, best, chosen, complete, studies, opts)
    files.atomic_write(Path(opts.out) / "summary.json",
                       json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def log_study_run(tracker: Tracker, parent: str, summary: dict, rows: list, best, chosen: dict,
                  complete: list, studies: slots.Studies, opts) -> None:
    """The study's MLflow run: comparison table, summary, preset, held-out metrics, the best and
    recommended runs tagged, figures; FINISHED once no slot is left."""
    table = comparison_markdown(rows)
    files.atomic_write(Path(opts.out) / "comparison.md", table + "\n")
    tracker.log_text(parent, table, "comparison.md")
    tracker.log_json(parent, summary, "summary.json")
    tracker.log_file(parent, summary["preset"], "preset")
    tracker.log_metrics(parent, {"best_fid": best.values[0],
                                 "best_fid_heldout": rows[0]["fid_heldout"],
                                 **{f"{r['key']}_fid_heldout": r["fid_heldout"] for r in rows[1:]}})
    children = tracker.children(parent)
    # the run this store holds for the best trial (a store made anew for an old study has none)
    best_run = best.user_attrs.get("mlflow_run_id")
    if best_run not in {run.info.run_id for run in children}:
        best_run = None
    for run in children:  # a resumed study may have a new winner
        if run.data.tags.get(ROLE) == "best" and run.info.run_id != best_run:
            tracker.tag(run.info.run_id, {ROLE: "trial", "schedsearch.best": "false"})
    if best_run:
        tracker.tag(best_run, {ROLE: "best", "schedsearch.best": "true"})
    pick = next(r for r in rows if r.get("recommended"))
    rec_run = (best_run if pick["key"] == "best"
               else tracker.find_child(parent, "baseline", pick["name"]))
    if rec_run:
        tracker.tag(rec_run, {"schedsearch.recommended": "true"})
    if opts.artifacts:
        log_figures(tracker, parent, summary, chosen, complete, studies.trials)
    if not slots.busy(studies):
        tracker.client.set_terminated(parent, "FINISHED")


def log_figures(tracker: Tracker, parent: str, summary: dict, chosen: dict, complete: list,
                study: optuna.Study) -> None:
    """FID by trial, the winner's σ list against the baselines', parameter importance."""
    from . import plots  # matplotlib: only when artifacts are drawn

    others = {k: p for k, p in chosen.items() if k != "best"}
    fids = {r["name"]: r["fid"] for r in summary["rows"][1:]}
    tracker.log_figure(parent, plots.fid_vs_trial([(t.number, t.values[0]) for t in complete],
                                                  fids), "fid_vs_trial.png")
    winner = chosen["best"]
    curves = {p.name: [float(s) for s in p.sigmas] for p in [winner, *others.values()]}
    tracker.log_figure(parent, plots.schedules(curves, "winner vs baselines",
                                               highlight=winner.name), "schedules.png")
    imp = importances(study)
    if imp:
        tracker.log_figure(parent, plots.importance(imp), "importance.png")
        summary["importance"] = imp


def importances(study: optuna.Study) -> dict:
    """fANOVA importances, or {} when too few trials share parameters to say anything."""
    try:
        if len(slots.trials_of(study, slots.COMPLETE)) < 4:
            return {}
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        with warnings.catch_warnings():  # "few trials in a regime": the plot says as much
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(
                study, target=target).items()}
    except (RuntimeError, ValueError):
        return {}


def preset_from_study(storage_url: str, study_name: str, name: str,
                      trial_number: Optional[int] = None) -> Preset:
    """A trial's preset (default: the best) from the study storage alone (no model needed)."""
    storage = slots.make_storage(storage_url)
    try:
        study = slots.load(storage, study_name)
    except ValueError:
        raise ValueError(f"no study named {study_name!r} in {slots.redact(storage_url)}") from None
    if trial_number is None:
        try:
            trial = min(study.best_trials, key=lambda t: t.values[0])
        except ValueError:
            raise ValueError(f"study {study_name!r} has no completed trial yet") from None
    else:
        matches = [t for t in slots.trials_of(study) if t.number == trial_number]
        if not matches or matches[0].state != slots.COMPLETE:
            raise ValueError(f"trial {trial_number} of {study_name!r} did not complete")
        trial = matches[0]
    cfg = study.user_attrs.get("config", {})
    held = study.user_attrs.get(f"heldout:trial{trial.number}")
    scores = {"fid_search": trial.values[0], **({"fid_heldout": held["fid"],
                                                 "kid_heldout": held["kid"]} if held else {})}
    # the family the study recorded; studies of 0.1.0 recorded none: a testbed's name is its
    # family, anything else stays "any" rather than a guess from the model string
    family = study.user_attrs.get("family") or (cfg.get("model") if cfg.get("model") in
                                                 ("digits", "gmm") else "any")
    return stored_preset(trial.user_attrs["candidate"], family).replace(
        name=name, family=family,
        provenance=presets.provenance(study=study_name, trial=trial.number, scores=scores,
                                      params=trial.params, model=cfg.get("model"), config=cfg))
