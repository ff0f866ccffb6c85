"""``run_study``: config → context → slots → work loop (baselines, then trials) → report.

One call runs one worker of a study: it loads the model and prompt sets (``context``), opens or
joins the study's slot queues (``slots``), scores every baseline slot and trial slot it can claim,
logging each to MLflow (``tracking``), and ends with the comparison and the preset (``report``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
from tqdm.auto import tqdm

from . import baselines, report, slots, solvers
from .config import StudyConfig, config_json, default_study_name, identity
from .context import Context
from .metrics import ScoreError
from .space import Space, make_sampler
from .tracking import Tracker, log_result, run_params, tracking_uri_for
from .version import __version__

__all__ = ["RunOptions", "StudyConfig", "default_study_name", "run_study"]


@dataclass
class RunOptions:
    """How this worker runs (not what the study measures: that is the config)."""

    out: Path
    storage: Optional[str] = None
    study_name: Optional[str] = None
    timeout: Optional[float] = None
    heartbeat: float = 10.0
    grace: float = 30.0
    progress: bool = True
    artifacts: bool = True
    export_user_preset: bool = True


def run_study(config: StudyConfig, opts: RunOptions, echo: Callable[[str], None] = print) -> dict:
    """Run (or join, or resume) the study and return its summary."""
    t_start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or default_study_name(config)
    storage_url = opts.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = slots.make_storage(storage_url, opts.heartbeat, opts.grace)
    ctx = Context(config, echo)
    ctx.artifacts = opts.artifacts
    studies = open_studies(storage, name, ctx)

    tracker = Tracker(tracking_uri_for(out), name, out / "mlartifacts")
    parent = tracker.study_run(name, {"config": json.dumps(config_json(config)),
                                      "storage": slots.redact(storage_url), **ctx.provenance()},
                               {"schedsearch.version": __version__, "schedsearch.budget": config.budget})
    recover(studies, tracker, parent)

    echo(f"study {name}: {config.trials} trials at {config.budget} NFE on {ctx.model.name} "
         f"({len(ctx.search_set)} search images, {len(ctx.heldout_set)} held-out)")
    echo(f"  storage {slots.redact(storage_url)}; MLflow {tracker.uri}")
    deadline = None if not opts.timeout else time.time() + opts.timeout
    work(studies, ctx, tracker, parent, opts, deadline)
    recover(studies, tracker, parent)   # runs of workers that died while this one waited
    summary = report.finalize(studies, ctx, tracker, parent, opts, name, echo)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    return summary


def _multi(config: StudyConfig) -> bool:
    return len(config.objectives) > 1


def open_studies(storage, name: str, ctx: Context) -> slots.Studies:
    """Create or join the study's slot queues with this config's sampler, pruner and seeds."""
    config = ctx.config
    multi = _multi(config)
    directions = ["minimize"] + (["maximize"] if "clip" in config.objectives else
                                 ["minimize"] if multi else [])
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)
              if config.pruner == "median" and not multi else optuna.pruners.NopPruner())
    seeds = ([] if "nfe" in config.objectives
             else Space(dict(config.space)).seed_trials(ctx.target))
    return slots.open_studies(
        storage, name, directions=directions, sampler=make_sampler(config.sampler, config.seed, multi),
        pruner=pruner, identity=identity(config), trials=config.trials, seeds=seeds,
        attrs={"config": config_json(config), "schedsearch_version": __version__,
               "family": ctx.family},
        baseline_groups=baseline_groups(config.baselines))


def baseline_groups(keys) -> list[list[str]]:
    """One slot per baseline; GITS and OSS share one because they share a teacher."""
    groups = [[k] for k in keys if k not in ("gits", "oss")]
    distilled = [k for k in ("gits", "oss") if k in keys]
    return groups + ([distilled] if distilled else [])


def recover(studies: slots.Studies, tracker: Tracker, parent: str) -> None:
    """Fail slots whose worker died (stale heartbeat; they are re-queued) and end their MLflow runs."""
    running = []
    for st in studies.all():
        slots.fail_stale(st)
        running += [t.user_attrs.get("mlflow_run_id") for t in slots.trials_of(st, slots.RUNNING)]
    tracker.close_orphans(parent, [r for r in running if r])
    # A worker killed between claiming a trial and creating its MLflow run leaves no run to close:
    # log one, so the dashboard shows every interrupted trial, as Optuna does.
    logged = {r.data.tags.get("schedsearch.trial") for r in tracker.children(parent)}
    for t in slots.trials_of(studies.trials, slots.FAIL):
        if "fail_reason" not in t.user_attrs and str(t.number) not in logged:
            run = tracker.child(parent, f"trial {t.number}", "trial", dict(t.params),
                                {"schedsearch.trial": t.number})
            tracker.end(run, "INTERRUPTED", "the worker stopped (killed, crashed or interrupted) "
                        "before this trial had an MLflow run; the trial was marked failed")


def work(studies: slots.Studies, ctx: Context, tracker: Tracker, parent: str, opts: RunOptions,
         deadline: Optional[float]) -> None:
    """Claim and run slots until none is left — baselines first, then trials — then wait for
    other workers' slots (a dead worker's slot comes back after the grace period and is run here)."""
    config = ctx.config
    bar = tqdm(total=config.trials, initial=min(slots.finished_slots(studies.trials), config.trials),
               desc="trials", unit="trial", disable=not opts.progress, dynamic_ncols=True)
    _show_best(bar, studies.trials, _multi(config))
    space = Space(dict(config.space))
    try:
        while deadline is None or time.time() < deadline:
            for st in studies.all():
                slots.fail_stale(st)
            slot = slots.claim(studies.baselines, studies.storage)
            if slot is not None:
                with slots.heartbeat(studies.storage, slot, opts.heartbeat):
                    evaluate_baselines(slot, studies.baselines, ctx, tracker, parent, bar.write)
                continue
            trial = slots.claim(studies.trials, studies.storage)
            if trial is not None:
                with slots.heartbeat(studies.storage, trial, opts.heartbeat):
                    state = evaluate_trial(trial, studies.trials, ctx, tracker, parent, space)
                bar.update(1)
                _show_best(bar, studies.trials, _multi(config))
                if state == "FAIL":
                    reason = slots.user_attrs(studies.storage, trial).get("fail_reason")
                    bar.write(f"  trial {trial.number} failed: {reason}")
                continue
            if not slots.busy(studies, slots.RUNNING):
                return
            time.sleep(min(5.0, max(0.5, opts.heartbeat)))
    finally:
        bar.close()


def _show_best(bar, study: optuna.Study, multi: bool) -> None:
    try:
        if multi:
            bar.set_postfix_str(f"pareto front {len(study.best_trials)}")
        else:
            bar.set_postfix_str(f"best FID {study.best_value:.3f} (trial {study.best_trial.number})")
    except ValueError:
        pass


def _logged(preset, ctx: Context, name: str):
    """The preset as a run logs it: under ``name``, with the study's provenance."""
    return preset.replace(name=name, provenance={**ctx.provenance(), **preset.provenance})


def evaluate_baselines(slot, study: optuna.Study, ctx: Context, tracker: Tracker, parent: str,
                       echo) -> None:
    """Score the baselines of one slot and log each like a trial."""
    keys = list(slot.user_attrs["baselines"])
    try:
        built = baselines.build(ctx, keys, echo)
        results = {}
        for key in keys:
            preset = built.get(key)
            if preset is None:
                continue
            res = ctx.score(preset, keep_images=16)
            results[key] = {"preset": preset.to_json(), **report.result_json(res)}
            run = tracker.child(parent, preset.name, "baseline", run_params(preset))
            log_result(tracker, run, _logged(preset, ctx, preset.name), res,
                       artifacts=ctx.artifacts, shown=_shown(ctx))
            tracker.end(run, "COMPLETE")
            echo(f"  baseline {preset.name:<34} NFE {preset.nfe:>3}  FID {res.fid:8.3f}")
    except BaseException as exc:
        slot.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
        study.tell(slot, state=optuna.trial.TrialState.FAIL)
        if isinstance(exc, Exception):
            echo(f"  baseline {', '.join(keys)} failed: {exc}")
            return
        raise
    slot.set_user_attr("results", results)
    study.tell(slot, min((r["fid"] for r in results.values()), default=float("nan")))


def _shown(ctx: Context) -> tuple:
    return ctx.search_set.prompts, ctx.search_set.seeds


def evaluate_trial(trial, study: optuna.Study, ctx: Context, tracker: Tracker, parent: str,
                   space: Space) -> str:
    """Sample the trial's candidate, score it (pruning on nested subsets), log it; returns the
    trial's final state name."""
    config, multi = ctx.config, _multi(ctx.config)
    nfe_range = (1, config.budget) if "nfe" in config.objectives else None
    run = None
    try:
        preset = space.suggest(trial, ctx.target, nfe_range)
        trial.set_user_attr("candidate", preset.to_json())
        run = tracker.child(parent, preset.name, "trial", {**trial.params, **run_params(preset)},
                            {"schedsearch.trial": trial.number})
        trial.set_user_attr("mlflow_run_id", run)

        def on_checkpoint(n, fid):
            if multi or n >= config.n_search:
                return  # the full-n value is the objective, not an intermediate one
            trial.report(fid, n)
            tracker.log_metrics(run, {"fid_partial": fid}, step=int(n))
            if trial.should_prune():
                raise optuna.TrialPruned(f"FID {fid:.3f} at n = {n} is worse than the median "
                                         f"of earlier trials")

        res = ctx.score(preset, on_checkpoint=on_checkpoint, keep_images=16)
    except optuna.TrialPruned as exc:
        return _end(study, trial, tracker, run, "PRUNED", str(exc))
    except (ScoreError, solvers.NonFiniteError, ValueError) as exc:
        trial.set_user_attr("fail_reason", str(exc))
        return _end(study, trial, tracker, run, "FAIL", str(exc))
    except BaseException as exc:  # interrupted: leave nothing RUNNING behind
        _end(study, trial, tracker, run, "INTERRUPTED", f"{type(exc).__name__}: {exc}")
        raise
    values = [res.fid] + ([res.clip] if "clip" in config.objectives else
                          [float(preset.nfe)] if multi else [])
    trial.set_user_attr("result", report.result_json(res))
    log_result(tracker, run, _logged(preset, ctx, f"{study.study_name}-trial{trial.number}"), res,
               artifacts=ctx.artifacts, shown=_shown(ctx))
    study.tell(trial, values if multi else values[0])
    tracker.end(run, "COMPLETE")
    return "COMPLETE"


def _end(study, trial, tracker: Tracker, run: Optional[str], state: str, reason: str) -> str:
    """Tell Optuna and MLflow how a trial ended without a score."""
    optuna_state = (optuna.trial.TrialState.PRUNED if state == "PRUNED"
                    else optuna.trial.TrialState.FAIL)
    study.tell(trial, state=optuna_state)
    if run:
        tracker.end(run, state, reason)
    return state

