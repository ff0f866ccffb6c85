"""The end of a study: the winner and every baseline re-scored on held-out prompts and seeds, the
recommendation, the comparison table, ``summary.json``, the study's MLflow run, and the preset.

``recommend(rows)`` is a pure function of the comparison rows; everything else reads the study's
storage, so any worker — or a resumed one — writes the same report.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import optuna

from . import files, presets, slots
from .config import ALL_BASELINES
from .freeu import FreeUPlan
from .metrics.paired import PairedBootstrap, compare_sets
from .presets import Preset
from .tracking import NAME, ROLE, Tracker, log_result


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


def failed_baselines(studies: slots.Studies) -> dict:
    """Baselines whose slot failed for a reason of their own (a teacher that could not be
    computed, a diverging schedule): reported with the reason, never silently left out."""
    return {", ".join(t.user_attrs.get("baselines", ())): t.user_attrs["fail_reason"]
            for t in slots.trials_of(studies.baselines, slots.FAIL) if "fail_reason" in t.user_attrs}


def heldout(study: optuna.Study, ctx, presets_: dict, winner: str) -> tuple[dict, dict]:
    """Held-out scores of ``presets_`` (key → preset; ``winner`` is the searched winner's key)
    on the study's K disjoint held-out seed sets, and for every other key the paired difference
    FID(winner) − FID(key) with its bootstrap CI (docs/scoring.md). Computed once per study and
    kept in its storage (``heldout:<key>``, ``ci:<winner>:<key>``); a resumed study with a new
    winner scores only what it lacks."""
    k = ctx.config.heldout_sets
    held = {key: _stored_heldout(study.user_attrs.get(f"heldout:{key}"), k) for key in presets_}
    cis = {key: _stored_ci(study.user_attrs.get(f"ci:{winner}:{key}"), k, ctx.config.bootstrap)
           for key in presets_ if key != winner}
    need = {key for key, h in held.items() if h is None}
    if any(c is None for c in cis.values()):
        need |= {winner} | {key for key, c in cis.items() if c is None}
    feats = {}
    for key in sorted(need):
        results = [ctx.score(presets_[key], which=f"heldout:{i}", keep_features=True)
                   for i in range(k)]
        feats[key] = [r.features for r in results]
        held[key] = {"fid": float(np.mean([r.fid for r in results])),
                     "kid": _mean([r.kid for r in results]),
                     "sets": [{"fid": r.fid, "kid": r.kid, "n": r.n} for r in results]}
        study.set_user_attr(f"heldout:{key}", held[key])
    missing = [key for key, c in cis.items() if c is None]
    if missing:
        with warnings.catch_warnings():   # too few images: the study said so when it started
            warnings.simplefilter("ignore", UserWarning)
            boots = [PairedBootstrap(ctx.ref.mu, ctx.ref.sigma, len(ctx.heldout_sets[i]),
                                     ctx.config.bootstrap, seed=0, set_index=i) for i in range(k)]
        a = [b.resampled_fids(f) for b, f in zip(boots, feats[winner])]
        fid_a = [s["fid"] for s in held[winner]["sets"]]
        for key in missing:
            b_fids = [b.resampled_fids(f) for b, f in zip(boots, feats[key])]
            cis[key] = compare_sets(boots, a, b_fids, fid_a,
                                    [s["fid"] for s in held[key]["sets"]]).as_json()
            study.set_user_attr(f"ci:{winner}:{key}", cis[key])
    return held, cis


def _stored_heldout(stored: Optional[dict], k: int) -> Optional[dict]:
    """A stored held-out score if it covers the K sets asked for (0.1.0 stored one set, flat)."""
    if stored is None:
        return None
    sets = stored.get("sets") or [{"fid": stored["fid"], "kid": stored["kid"],
                                   "n": stored.get("n")}]
    return {**stored, "sets": sets} if len(sets) == k else None


def _stored_ci(stored: Optional[dict], k: int, resamples: int) -> Optional[dict]:
    """A stored paired interval if it was drawn as asked for now: over the K sets (a re-run with
    another --heldout-sets re-scores the held-out FIDs, and an interval over the old sets would
    sit beside them) and with this many resamples."""
    if stored is None or stored.get("sets", 1) != k or stored.get("resamples") != resamples:
        return None
    return stored


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def recommend(rows: list[dict]) -> dict:
    """The row to use: the searched winner (key "best"), unless a row spending the same NFE
    scored as well or better (a tie goes to the known schedule). The evidence is what picked the
    winner: its FID on the validation sets, against the best same-NFE baseline's there (the rows
    carrying ``fid_validation``); without it, the search subset. Never held-out, so the held-out
    column stays an honest check; the user never gets a preset that loses to a known schedule on
    the images it was chosen on."""
    best = next(r for r in rows if r["key"] == "best")
    same_nfe = [r for r in rows if r["key"] == "best" or r["nfe"] == best["nfe"]]
    score = "fid"
    if "fid_validation" in best and any("fid_validation" in r for r in same_nfe if r is not best):
        score, same_nfe = "fid_validation", [r for r in same_nfe if "fid_validation" in r]
    return min(same_nfe, key=lambda r: (r[score], r["key"] == "best"))


def comparison_markdown(rows: list[dict]) -> str:
    """The comparison table: search and held-out FID, KID, the winner's paired held-out
    difference to each row with its 95% CI (negative: the winner is better), and the ratio to
    Karras at the budget."""
    ref = next((r for r in rows if r["key"] == "karras"), None)
    head = ("| schedule | NFE | solver | FID (search) | FID (held-out) | KID (held-out) | "
            "best − this, held-out (95% CI) |")
    if ref:
        head += " held-out vs Karras@budget |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kid = "n/a" if r["kid_heldout"] is None else f"{r['kid_heldout']:.4f}"
        line = (f"| {'★ ' if r.get('recommended') else ''}{r['name']} | {r['nfe']} | "
                f"{r['solver']} | {r['fid']:.3f} | {r['fid_heldout']:.3f} | {kid} | "
                f"{_ci_text(r.get('vs_best'))} |")
        if ref:
            line += f" {r['fid_heldout'] / ref['fid_heldout']:.2f}× |"
        lines.append(line)
    if any(not c["lo"] <= c["delta"] <= c["hi"] for c in (r.get("vs_best") for r in rows) if c):
        # it reads like a bug to anyone who has not met the basic bootstrap interval
        lines.append("\nAn interval beside its difference rather than around it is not an error: "
                     "FID is biased upward at a few hundred images, and the (basic bootstrap) "
                     "interval takes that bias out (docs/scoring.md, \"Why basic\").")
    return "\n".join(lines)


def pareto_markdown(summary: dict) -> str:
    """The Pareto front of a multi-objective study (search-subset values), one row per trial
    in the order of the second objective; '' for a single-objective study."""
    if "pareto_front" not in summary:
        return ""
    second = summary["objectives"][1]
    lines = [f"Pareto front, FID against {second.upper()} (search subset; lower FID is better, "
             f"{'fewer NFE' if second == 'nfe' else 'higher CLIP score'} too):", "",
             f"| trial | FID (search) | {second.upper()} | solver |", "|---|---|---|---|"]
    for p in summary["pareto_front"]:
        fid, other = p["values"]
        other = f"{other:.0f}" if second == "nfe" else f"{other:.4f}"
        lines.append(f"| {p['trial']} | {fid:.3f} | {other} | {p['params'].get('solver', '?')} |")
    return "\n".join(lines)


def _ci_text(ci: Optional[dict]) -> str:
    if ci is None:
        return "—"
    text = f"{ci['delta']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
    return f"**{text}**" if ci["excludes_zero"] else text


def _row(key: str, preset: Preset, fid: float, held: dict, ci: Optional[dict]) -> dict:
    row = {"name": preset.name, "key": key, "nfe": preset.nfe, "fid": fid,
           "fid_heldout": held["fid"], "kid_heldout": held["kid"], "solver": preset.solver}
    if len(held["sets"]) > 1:
        row["fid_heldout_sets"] = [s["fid"] for s in held["sets"]]
    if ci is not None:   # FID(winner) − FID(this row) on the held-out images, paired
        overall = ci["overall"]
        row["vs_best"] = {"delta": overall["delta"], "lo": overall["lo"], "hi": overall["hi"],
                          "excludes_zero": overall["excludes_zero"], "sets": ci["sets"],
                          "resamples": overall["resamples"], "method": overall["method"]}
    return row


@dataclass(frozen=True)
class Done:
    """A completed trial of either stage, under the number it is shown with (the local stage's
    trials are numbered after the global stage's slots)."""

    number: int
    trial: optuna.trial.FrozenTrial

    @property
    def value(self) -> float:
        return self.trial.values[0]

    @property
    def params(self) -> dict:
        """The point's parameters (a local-stage trial stores its absolute ones)."""
        return self.trial.user_attrs.get("candidate", {}).get("params") or self.trial.params


def completed(studies: slots.Studies) -> list[Done]:
    """Every completed trial of both stages."""
    return [Done(slots.slot_number(t) + offset, t) for st, offset in studies.numbered()
            for t in slots.trials_of(st, slots.COMPLETE)]


def winner(study: optuna.Study, ctx, complete: list[Done]) -> Done:
    """The best trial, chosen with less luck than its search FID alone. The search subset only
    nominates: the ``rerank`` best trials there, and the best warm-start trial (the best known
    schedule, run as a trial), are scored again on the search prompts with fresh seeds — the
    ``validation_sets`` validation sets — and the lowest mean FID there wins. With dozens of noisy
    candidates the lowest search FID is partly chance (at 8 NFE on digits a winner 0.1 better than
    Karras on the search subset was 0.24 worse on fresh seeds); fresh images hold no such luck,
    and keeping the known schedule among the contenders means a trial that is only lucky loses to
    it. Scores are kept in the study, so a resumed study re-scores only new contenders."""
    ranked = sorted(complete, key=lambda d: (d.value, d.number))
    contenders = ranked[:ctx.config.rerank]
    warm = [d for d in ranked if "warm" in d.trial.user_attrs]
    if warm and warm[0] not in contenders:
        contenders.append(warm[0])
    if len(contenders) < 2:
        return ranked[0]

    def fresh(d: Done) -> float:
        preset = stored_preset(d.trial.user_attrs["candidate"], ctx.family)
        return float(np.mean(validation_fids(study, ctx, f"trial{d.number}", preset)))

    return min(contenders, key=lambda d: (fresh(d), d.number))


def validation_fids(study: optuna.Study, ctx, name: str, preset: Preset) -> list[float]:
    """FID of ``preset`` (a trial, "trial<N>", or a baseline's key) on each validation set,
    scored once and kept in the study (``validation:<name>`` for the first set,
    ``validation:<j>:<name>`` for the others)."""
    fids = []
    for j in range(ctx.config.validation_sets):
        attr = f"validation:{name}" if j == 0 else f"validation:{j}:{name}"
        val = study.user_attrs.get(attr)
        if val is None:
            val = ctx.score(preset, which=f"validation:{j}").fid
            study.set_user_attr(attr, val)
        fids.append(val)
    return fids


def comparison(studies: slots.Studies, ctx, best: Done) -> tuple[list, dict]:
    """The rows (winner first, then every baseline) with search and held-out scores and the
    paired CIs of the winner against each baseline, and the presets they stand for."""
    winner = stored_preset(best.trial.user_attrs["candidate"], ctx.family)
    chosen = {"best": winner.replace(name=f"best (trial {best.number})")}
    fids = {"best": best.value}
    for key, b in collect_baselines(studies, ctx.family).items():
        chosen[key], fids[key] = b["preset"], b["fid"]
    # stored under the trial's number, so a resumed study with another winner scores it anew
    names = {key: (f"trial{best.number}" if key == "best" else key) for key in chosen}
    held, cis = heldout(studies.trials, ctx, {names[k]: p for k, p in chosen.items()},
                        names["best"])
    rows = [_row(key, chosen[key], fids[key], held[names[key]], cis.get(names[key]))
            for key in chosen]
    if f"validation:trial{best.number}" in studies.trials.user_attrs:
        # the winner met its rivals on fresh seeds: so does the best same-NFE baseline, and
        # the recommendation compares the two there
        for row in [rows[0]] + _best_same_nfe(rows):
            name = f"trial{best.number}" if row["key"] == "best" else row["key"]
            row["fid_validation"] = float(np.mean(validation_fids(
                studies.trials, ctx, name, chosen[row["key"]])))
    return rows, chosen


def _best_same_nfe(rows: list[dict]) -> list[dict]:
    """The baseline spending the winner's NFE with the lowest search FID (none or one)."""
    same = [r for r in rows[1:] if r["nfe"] == rows[0]["nfe"]]
    return [min(same, key=lambda r: r["fid"])] if same else []


def recommended_preset(pick: dict, preset: Preset, best, ctx, opts, name: str) -> Preset:
    """The ★ row's preset under the study's name, with its provenance: the run's model and
    prompts, the study, the trial or baseline it is, its scores."""
    scores = {"fid_search": pick["fid"], "fid_heldout": pick["fid_heldout"],
              "kid_heldout": pick["kid_heldout"]}
    origin = ({"trial": best.number, "params": best.params} if pick["key"] == "best" else
              {"baseline": pick["key"], "best_trial": best.number,
               "note": "no searched schedule beat this baseline at this NFE"
                       + (" on the validation seeds" if "fid_validation" in pick
                          else " on the search subset")})
    storage = opts.storage or f"sqlite:///{(Path(opts.out) / 'study.db').resolve()}"
    prov = {**ctx.provenance(), "study": name, "storage": slots.redact(storage), **origin,
            "scores": scores}
    return preset.replace(name=name, provenance=prov)


def export_preset(preset: Preset, opts) -> dict:
    """Write the recommended preset next to the study and, by name, to the user preset folder;
    returns the paths written. The study's own file is written first; a copy the user folder
    refuses (a shipped name, another study's preset, a folder that cannot be written) becomes a
    "warning" line for the caller to print, and the study goes on."""
    name = preset.name
    written = {"preset": str(preset.save(Path(opts.out) / f"{name}.preset.json"))}
    if opts.export_user_preset:
        try:
            written["user_preset"] = str(preset.save(presets.user_path(preset)))
        except ValueError as exc:
            written["warning"] = f"preset not copied to the user preset folder: {exc}"
        except OSError as exc:
            written["warning"] = (f"preset not copied to the user preset folder "
                                  f"{presets.user_dir()} ({exc.strerror}): point "
                                  f"$SCHEDSEARCH_PRESETS at a folder you can write to")
        if "warning" in written:
            written["warning"] += f"; the study's preset is in {written['preset']}"
    return written


def finalize(studies: slots.Studies, ctx, tracker: Tracker, parent: str, opts, name: str,
             echo) -> dict:
    """Compare, recommend, export and log; returns the study's summary."""
    config, study = ctx.config, studies.trials
    multi = len(config.objectives) > 1
    complete = completed(studies)
    summary = {"study": name, "budget": config.budget,
               "trials": {"global": slots.counts(study),
                          "local": dict(sum((Counter(slots.counts(run)) for run in studies.local),
                                        Counter()))},
               "finished": sum(slots.finished_slots(s) for s in (study, *studies.local)),
               "model": config.model, "out": str(opts.out), "rows": []}
    summary["failed_baselines"] = failed_baselines(studies)
    if not complete:
        summary["fail_reasons"] = sorted({t.user_attrs["fail_reason"] for st in (study, *studies.local)
                                          for t in slots.trials_of(st, slots.FAIL)
                                          if "fail_reason" in t.user_attrs})
        if not slots.busy(*studies.all()):
            tracker.client.set_terminated(parent, "FAILED")
        return summary
    if multi:
        front = {t.number for t in study.best_trials}
        best = min((d for d in complete if d.number in front), key=lambda d: d.value)
        summary["objectives"] = list(config.objectives)
        summary["pareto_front"] = [{"trial": t.number, "values": t.values, "params": t.params}
                                   for t in sorted(study.best_trials, key=lambda t: t.values[1])]
    else:
        best = winner(studies.trials, ctx, complete)
        study.set_user_attr("winner", best.number)   # what export picks without --trial
        summary["winner_choice"] = {"rerank": config.rerank,
                                    "validation_sets": config.validation_sets,
                                    "images_per_set": config.n_search}
    rows, chosen = comparison(studies, ctx, best)
    summary.update(rows=rows, best_trial=best.number, best_params=best.params)
    pick = recommend(rows)
    pick["recommended"] = True
    summary["recommended"] = pick["key"]
    preset = recommended_preset(pick, chosen[pick["key"]], best, ctx, opts, name)
    # what `schedsearch export` gives without --trial, from the storage alone: this very preset
    # (the ★ row, a baseline included), and the run's provenance for any trial it exports
    study.set_user_attr("recommended", {"key": pick["key"], "preset": preset.to_json()})
    study.set_user_attr("provenance", ctx.provenance())
    summary.update(export_preset(preset, opts))
    log_study_run(tracker, parent, summary, rows, best, chosen, complete, studies, ctx, opts)
    files.atomic_write(Path(opts.out) / "summary.json",
                       json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def log_study_run(tracker: Tracker, parent: str, summary: dict, rows: list, best: Done,
                  chosen: dict, complete: list, studies: slots.Studies, ctx, opts) -> None:
    """The study's MLflow run: comparison table, summary, preset, held-out metrics, the best and
    recommended runs tagged, their artifacts and the study's figures; FINISHED once no slot is
    left."""
    table = comparison_markdown(rows) + "".join(
        f"\n\nbaseline {k} failed: {why}" for k, why in summary["failed_baselines"].items())
    if "pareto_front" in summary:
        table += "\n\n" + pareto_markdown(summary)
    files.atomic_write(Path(opts.out) / "comparison.md", table + "\n")
    tracker.log_text(parent, table, "comparison.md")
    tracker.log_json(parent, summary, "summary.json")
    tracker.log_file(parent, summary["preset"], "preset")
    tracker.log_metrics(parent, {"best_fid": best.value,
                                 "best_fid_heldout": rows[0]["fid_heldout"],
                                 **{f"{r['key']}_fid_heldout": r["fid_heldout"] for r in rows[1:]}})
    runs = mark_runs(tracker, parent, rows, best)
    for r in rows:   # held-out scores on the runs themselves, so they can be table columns
        if runs.get(r["key"]):
            ci = r.get("vs_best") or {}
            tracker.log_metrics(runs[r["key"]], {
                "fid_heldout": r["fid_heldout"], "kid_heldout": r["kid_heldout"],
                "best_minus_this_heldout": ci.get("delta"), "ci_lo": ci.get("lo"),
                "ci_hi": ci.get("hi")})
    tracker.describe(parent, describe_study(summary, table, ctx))
    tracker.describe(None, f"schedsearch study **{summary['study']}**: the best "
                           f"{summary['budget']}-call sampling schedule for {ctx.config.model}. "
                           f"The run `{summary['study']}` holds the comparison; each trial and "
                           f"baseline is a run under it.")
    if opts.artifacts:
        log_artifacts(tracker, runs, chosen, ctx)
        log_figures(tracker, parent, summary, chosen, complete, studies.trials)
    if not slots.busy(*studies.all()):
        tracker.client.set_terminated(parent, "FINISHED")


def mark_runs(tracker: Tracker, parent: str, rows: list, best: Done) -> dict:
    """Tag and name the winner's run ("best (trial N)") and the recommended one ("★ ..."), put
    back the names of runs a resumed study no longer ranks first; key → run id of each row."""
    children = tracker.children(parent)
    # the run this store holds for the best trial (a store made anew for an old study has none)
    best_run = best.trial.user_attrs.get("mlflow_run_id")
    if best_run not in {run.info.run_id for run in children}:
        best_run = None
    runs = {r["key"]: best_run if r["key"] == "best"
            else tracker.find_child(parent, "baseline", r["name"]) for r in rows}
    pick = next(r for r in rows if r.get("recommended"))
    for run in children:  # a resumed study may have a new winner or recommendation
        tags = run.data.tags
        if run.info.run_id not in runs.values() and (tags.get(ROLE) == "best" or
                                                     tags.get("schedsearch.recommended") == "true"):
            tracker.tag(run.info.run_id, {ROLE: tags.get(ROLE) if tags.get(ROLE) != "best"
                                          else "trial", "schedsearch.best": "false",
                                          "schedsearch.recommended": "false"})
            tracker.rename(run.info.run_id, tags.get(NAME, run.info.run_name))
    if best_run:
        tracker.tag(best_run, {ROLE: "best", "schedsearch.best": "true"})
    for r in rows:
        if runs.get(r["key"]):
            star = "★ " if r is pick else ""
            tracker.rename(runs[r["key"]], star + r["name"])
            # both ways: a resumed study's former ★ (a row still) loses it
            tracker.tag(runs[r["key"]], {"schedsearch.recommended": "true" if star else "false"})
    return runs


def describe_study(summary: dict, table: str, ctx) -> str:
    """The study run's description in the MLflow UI: what it is, the recommendation, the table."""
    pick = next(r for r in summary["rows"] if r.get("recommended"))
    # trials that ran to the end: the state counts also hold queued slots and, for an
    # interrupted trial, both its failed run and its re-queued copy
    trials = summary["finished"]
    return (f"**{summary['study']}** — the best {summary['budget']}-call schedule for "
            f"`{ctx.config.model}`, searched over {trials} trials (the winner: "
            f"{summary['rows'][0]['name']}).\n\n★ recommended: **{pick['name']}** (FID {pick['fid']:.3f} on the search "
            f"subset, {pick['fid_heldout']:.3f} held-out). Preset: `{summary['preset']}`.\n\n"
            f"{table}\n\n*best − this*: FID of the winner minus FID of the row on the same "
            f"held-out prompts and seeds, with a 95% paired bootstrap interval; negative means the "
            f"winner is better, **bold** when the interval excludes zero.")


def log_artifacts(tracker: Tracker, runs: dict, chosen: dict, ctx) -> None:
    """Schedule plot, sample grid, preset and the first images for the winner and every
    baseline — only these, at the end, so trials spend their time in model calls. The images are
    sampled again: the same prompts and seeds give the same images bit for bit."""
    shown = (ctx.search_set.prompts, ctx.search_set.seeds)
    for key, run in runs.items():
        if run is None or tracker.has_artifact(run, "preset.json"):
            continue
        preset = chosen[key]
        images = ctx.sample_first(preset, 16)
        logged = preset.replace(provenance={**ctx.provenance(), **preset.provenance})
        log_result(tracker, run, logged, images, shown)


def log_figures(tracker: Tracker, parent: str, summary: dict, chosen: dict, complete: list,
                study: optuna.Study) -> None:
    """FID by trial, the winner's σ list against the baselines', a multi-objective study's
    Pareto front, parameter importance."""
    from . import plots  # matplotlib: only when artifacts are drawn

    others = {k: p for k, p in chosen.items() if k != "best"}
    fids = {r["name"]: r["fid"] for r in summary["rows"][1:]}
    tracker.log_figure(parent, plots.fid_vs_trial([(d.number, d.value) for d in complete],
                                                  fids), "fid_vs_trial.png")
    winner = chosen["best"]
    curves = {p.name: [float(s) for s in p.sigmas] for p in [winner, *others.values()]}
    tracker.log_figure(parent, plots.schedules(curves, "winner vs baselines",
                                               highlight=winner.name), "schedules.png")
    if "pareto_front" in summary:
        second = summary["objectives"][1]
        xlabel = "NFE (model calls)" if second == "nfe" else "CLIP score (higher is better)"
        # baselines have an NFE but no CLIP score: they are drawn only against the NFE
        bases = ({r["name"]: (r["nfe"], r["fid"]) for r in summary["rows"][1:]}
                 if second == "nfe" else {})
        tracker.log_figure(parent, plots.pareto(
            [tuple(d.trial.values[::-1]) for d in complete],
            [tuple(p["values"][::-1]) for p in summary["pareto_front"]], bases, xlabel,
            integer_x=second == "nfe"),
            "pareto_front.png")
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


def _spans(numbers) -> str:
    """0-3, 5, 7-9"""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _stored_trials(storage, study: optuna.Study) -> list[tuple[int, optuna.trial.FrozenTrial]]:
    """(shown number, trial) of every trial of both stages (0.1.0 studies have one stage)."""
    return [(slots.slot_number(t) + offset, t) for st, offset in slots.stored_stages(storage, study)
            for t in slots.trials_of(st)]


def _pick_trial(storage, study: optuna.Study, number: Optional[int]) -> Done:
    trials = _stored_trials(storage, study)
    done = [Done(n, t) for n, t in trials if t.state == slots.COMPLETE]
    if number is None and study.user_attrs.get("winner") in {d.number for d in done}:
        number = study.user_attrs["winner"]   # the winner the study's report chose
    if number is None:
        if not done:
            raise ValueError(f"study {study.study_name!r} has no completed trial yet")
        if len(study.directions) > 1:    # the Pareto front's best FID, as the report takes it
            front = {t.number for t in study.best_trials}
            done = [d for d in done if d.number in front]
        return min(done, key=lambda d: (d.value, d.number))
    # a slot's attempts share its number (a killed one, then its retry): the completed first
    matches = sorted(((n, t) for n, t in trials if n == number),
                     key=lambda m: m[1].state != slots.COMPLETE)
    completed_ = _spans(d.number for d in done)
    if not matches:
        raise ValueError(f"study {study.study_name!r} has no trial {number}: its trials are "
                         f"{_spans(n for n, _ in trials)} (completed: {completed_})")
    if matches[0][1].state != slots.COMPLETE:
        raise ValueError(f"trial {number} of {study.study_name!r} did not complete (it is "
                         f"{matches[0][1].state.name}); completed trials: {completed_}")
    return Done(*matches[0])


def _undated(provenance: dict) -> dict:
    """A stored provenance without its date and version, which an export stamps anew."""
    return {k: v for k, v in provenance.items() if k not in ("date", "schedsearch_version")}


def preset_from_study(storage_url: str, study_name: str, name: str,
                      trial_number: Optional[int] = None) -> Preset:
    """A trial's preset (default: the best of both stages) from the study storage alone (no
    model needed)."""
    storage = slots.make_storage(storage_url)
    try:
        study = slots.load(storage, study_name)
    except ValueError:
        names = sorted(n for n in optuna.get_all_study_names(storage) if ":" not in n)
        raise ValueError(f"no study named {study_name!r} in {slots.redact(storage_url)}; it holds "
                         + (", ".join(names) if names else "none")) from None
    recommended = study.user_attrs.get("recommended")
    run = _undated(study.user_attrs.get("provenance", {}))   # the run's model, prompts, extractor
    if trial_number is None and isinstance(recommended, dict):
        # the ★ row, as the run wrote it (a baseline when no searched schedule beat it)
        preset = Preset.from_json(recommended["preset"], origin=f"study {study_name!r}")
        return preset.replace(name=name,
                              provenance=presets.provenance(**_undated(preset.provenance)))
    pick = _pick_trial(storage, study, trial_number)
    cfg = study.user_attrs.get("config", {})
    held = study.user_attrs.get(f"heldout:trial{pick.number}")
    scores = {"fid_search": pick.value, **({"fid_heldout": held["fid"],
                                             "kid_heldout": held["kid"]} if held else {})}
    # the family the study recorded; studies of 0.1.0 recorded none: a testbed's name is its
    # family, anything else stays "any" rather than a guess from the model string
    family = study.user_attrs.get("family") or (cfg.get("model") if cfg.get("model") in
                                                 ("digits", "gmm") else "any")
    return stored_preset(pick.trial.user_attrs["candidate"], family).replace(
        name=name, family=family,
        provenance=presets.provenance(**{"model": cfg.get("model"), **run},
                                      study=study_name, storage=slots.redact(storage_url),
                                      trial=pick.number, scores=scores, params=pick.params,
                                      config=cfg))
