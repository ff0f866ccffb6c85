"""``run_study``: config → context → slots → work loop (baselines, global stage, local stage) →
report.

One call runs one worker of a study: it loads the model and prompt sets (``context``), opens or
joins the study's slot queues (``slots``), scores every slot it can claim — the baselines first,
then the global stage (the paper's seeds, the best baselines re-run as free-form trials with
every searched solver, then the sampler's own points), then the local stage (CMA-ES runs around
the global stage's best and the best free-form trial of another solver) — logging each to MLflow
(``tracking``), and ends with the comparison and the preset (``report``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import optuna
from tqdm.auto import tqdm

from . import baselines, models, presets, report, slots, solvers
from .config import StudyConfig, applicable_baselines, config_json, default_study_name, identity
from .context import Context, read_inputs
from .metrics import ScoreError
from .metrics.paired import MIN_IMAGES
from .metrics.features import default_kind
from .space import Space, make_sampler, refine_sampler
from .tracking import Tracker, check_reachable, run_params, tracking_uri_for
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

    def __post_init__(self):
        # a zero or negative heartbeat would spin its thread against the database; a grace shorter
        # than the heartbeat would let other workers take over live trials; NaN never times out
        for key, value in (("heartbeat", self.heartbeat), ("grace", self.grace),
                           ("timeout", self.timeout)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"--{key} must be a number of seconds > 0, got {value!r}")
        if self.study_name is not None and not presets.plain_name(self.study_name):
            # ':' is also how a study's own stages are named (NAME:baselines, NAME:refine)
            raise ValueError(f"--study-name {self.study_name!r}: use letters, digits and . _ + - "
                             f"(it names the run folder, the preset and the study's stages)")
        if self.grace <= self.heartbeat:
            raise ValueError(f"--grace ({self.grace:g} s) must exceed --heartbeat "
                             f"({self.heartbeat:g} s): a running trial proves it is alive once "
                             f"per heartbeat, and one silent for the grace period is taken over")


def run_study(config: StudyConfig, opts: RunOptions, echo: Callable[[str], None] = print) -> dict:
    """Run (or join, or resume) the study and return its summary."""
    t_start = time.perf_counter()
    check_reachable(tracking_uri_for(opts.out))
    inputs = read_inputs(config)   # bad prompts or reference files: one line, no study left behind
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or default_study_name(config)
    storage_url = opts.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = slots.make_storage(storage_url, opts.heartbeat, opts.grace)
    ctx = Context(config, echo, inputs)
    ctx.artifacts = opts.artifacts
    space = Space(dict(config.space))
    dropped = space.notes(ctx.target)   # refused here, before any work
    model_baselines(ctx)
    # MLflow before the study: a store it cannot write to is one line with no study stored (not
    # before the model: a prompt the model refuses must leave no mlflow.db behind)
    tracker = Tracker(tracking_uri_for(out), name, out / "mlartifacts")
    studies = open_studies(storage, name, ctx, opts.grace)
    parent = tracker.study_run(name, {"config": json.dumps(config_json(config)),
                                      "storage": slots.redact(storage_url), **ctx.provenance()},
                               {"schedsearch.version": __version__, "schedsearch.budget": config.budget},
                               uid=studies.trials.user_attrs.get("uid"))
    recover(studies, tracker, parent, opts.grace)

    n1, n2 = slots.stages_of(studies, config.stages()[1])
    runs = len(studies.local)   # laid out once the global stage is done
    split = f"{n2} local" + (f" in {runs} CMA-ES runs" if runs > 1 else
                             f" in up to {config.refine_starts} CMA-ES runs"
                             if not runs and n2 > 1 and config.refine_starts > 1 else "")
    echo(f"study {name}: {n1 + n2} trials ({n1} global, {split}) at {config.budget} NFE "
         f"on {ctx.model.name} ({len(ctx.search_set)} search images, "
         f"{len(ctx.heldout_set)} held-out)")
    echo(f"  storage {slots.redact(storage_url)}; MLflow {tracker.uri}")
    for line in dropped:   # what the model leaves out of the configured space, said once
        echo(f"  {line}")
    if config.n_heldout < MIN_IMAGES:   # said once here, not as a warning per comparison
        echo(f"  --n-heldout {config.n_heldout}: paired CIs from fewer than {MIN_IMAGES} images "
             f"exclude zero far more often than 5% of the time; they are computed, but read them "
             f"as a smoke test, not a decision")
    if config.sampler in ("cmaes", "gp") and len(space.families(ctx.target)) > 1:
        echo(f"  --sampler {config.sampler}: it models only the parameters every trial shares; "
             f"with both families in the space those are the categorical ones (family, end, "
             f"solver), so its other choices are random draws (docs/search.md); tpe models the "
             f"whole space. The local stage is CMA-ES either way")
    deadline = None if not opts.timeout else time.time() + opts.timeout
    Worker(studies, ctx, tracker, parent, opts, echo).work(deadline)
    recover(studies, tracker, parent, opts.grace)   # runs of workers that died while this one waited
    summary = report.finalize(studies, ctx, tracker, parent, opts, name, echo)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    return summary


def _multi(config: StudyConfig) -> bool:
    return len(config.objectives) > 1


def _pruner(config: StudyConfig):
    if config.pruner == "median" and not _multi(config):
        return optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def warm_slots(config: StudyConfig, space: Space) -> int:
    """Slots that re-run the best baselines as free-form trials, one per (baseline, solver)."""
    if "knots" not in space.ranges["family"]:
        return 0
    return config.warm_start * len(space.ranges["solver"])


def open_studies(storage, name: str, ctx: Context, grace: float = 30.0) -> slots.Studies:
    """Create or join the study's slot queues: the global stage's plan (seeds, warm starts, the
    sampler's own points), the local stage's slots and one slot per baseline group."""
    config = ctx.config
    multi = _multi(config)
    directions = ["minimize"] + (["maximize"] if "clip" in config.objectives else
                                 ["minimize"] if multi else [])
    space = Space(dict(config.space))
    stored = slots.peek(storage, name)
    n1, _ = config.stages()
    if stored is not None:
        check_resume(config, stored, name)
        if stored.get("local_slots") is not None:   # the local runs are laid out: they grow
            n1 = int(stored.get("slots") or 0)
    # with the NFE searched, the seeds and warm starts spend the whole budget: the front's top
    # end then starts from the best known schedules, as a single-objective study does
    at_budget = {"nfe": config.budget} if "nfe" in config.objectives else {}
    plan = [({"seeded_from": why}, {**params, **at_budget})
            for why, params in space.seed_trials(ctx.target)][:n1]
    plan += [({"warm": k}, {}) for k in range(min(warm_slots(config, space), n1 - len(plan)))]
    plan += [({}, {})] * (n1 - len(plan))
    return slots.open_studies(
        storage, name, directions=directions,
        sampler=make_sampler(config.sampler, config.seed, multi), pruner=_pruner(config),
        identity=identity(config), plan=plan, grace=grace,
        attrs={"config": config_json(config), "schedsearch_version": __version__,
               "family": ctx.family},
        baseline_groups=baseline_groups(model_baselines(ctx)), trials=config.trials,
        defaults=identity_defaults(ctx))


def identity_defaults(ctx: Context) -> dict:
    """What a study's identity keys left unset stand for on this model: naming the default
    (``--guidance 3`` on gmm, ``--height 512`` on SD1.5) is the same study as leaving it out."""
    height, width = getattr(ctx.model, "native_size", (None, None))
    return {"guidance": models.default_guidance(ctx.family),
            "prompts": models.DEFAULT_PROMPTS.get(ctx.family),
            "extractor": default_kind(ctx.model), "height": height, "width": width}


# How a study searches is fixed when it is created; only its number of trials may grow.
PLAN_KEYS = ("refine", "refine_starts", "refine_margin", "warm_start", "sampler", "seed",
             "pruner")


def check_resume(config: StudyConfig, stored: dict, name: str) -> None:
    """Refuse, in one line, a run that would continue a stored study on another plan: other
    stage settings, sampler or seed (the slots already enqueued were drawn under the stored ones),
    or fewer trials than it holds (enqueued slots are not taken back). More trials extend it."""
    old, new = stored.get("config") or {}, config_json(config)
    diff = [k for k in PLAN_KEYS if k in old and old[k] != new[k]]
    if diff:
        raise ValueError(
            f"study {name!r} was created with "
            + ", ".join(f"{k} {old[k]!r}" for k in diff) + "; now "
            + ", ".join(f"{k} {new[k]!r}" for k in diff)
            + ". How a study searches is fixed when it is created: re-run with the stored values "
              "to continue it (--trials may grow), or pass --study-name NEW for a new study")
    held = slots.planned_trials(stored)
    if held is not None and config.trials < held:
        raise ValueError(f"study {name!r} holds {held} trials; --trials {config.trials} cannot "
                         f"take any back (it may add more): re-run with --trials {held} or "
                         f"more, or stop a run early with --timeout or Ctrl-C")


def model_baselines(ctx: Context) -> list[str]:
    """The study's baseline keys: the config's, or every one that applies to its model's kind;
    one that does not apply is refused in one line naming those that do."""
    return applicable_baselines(ctx.config.baselines, ctx.model.table.kind)


def baseline_groups(keys) -> list[list[str]]:
    """One slot per baseline; GITS and OSS share one because they share a teacher."""
    groups = [[k] for k in keys if k not in ("gits", "oss")]
    distilled = [k for k in ("gits", "oss") if k in keys]
    return groups + ([distilled] if distilled else [])


def recover(studies: slots.Studies, tracker: Tracker, parent: str, grace: float = 30.0) -> None:
    """Fail slots whose worker died (stale heartbeat; they are re-queued) and end their MLflow runs."""
    alive, now = set(), time.time()
    for st in studies.all():
        slots.fail_stale(st)
        for t in slots.trials_of(st):
            run = t.user_attrs.get("mlflow_run_id")
            # a running trial's run, and one whose trial was just told, are their worker's to end:
            # a live worker logs the result right after telling Optuna, and closing the run in
            # that gap (this worker's list of running runs may be a moment old) would mark a
            # scored trial interrupted. A stale-failed trial's run is an orphan.
            told = (t.state != slots.RUNNING and (t.state != optuna.trial.TrialState.FAIL
                                                  or "fail_reason" in t.user_attrs)
                    and t.datetime_complete is not None
                    and now - t.datetime_complete.timestamp() < grace)
            if run and (t.state == slots.RUNNING or told):
                alive.add(run)
    tracker.close_orphans(parent, alive, min_age=grace)
    # A worker killed between claiming a trial and creating its MLflow run leaves no run to close:
    # log one, so the dashboard shows every interrupted trial, as Optuna does.
    # by number among KILLED runs: a retry shares its slot's number, and its FINISHED run must not
    # hide that the first attempt has none
    logged = {r.data.tags.get("schedsearch.trial") for r in tracker.children(parent)
              if r.info.status == "KILLED"}
    for st, offset in studies.numbered():
        for t in slots.trials_of(st, slots.FAIL):
            number = slots.slot_number(t) + offset
            if ("fail_reason" not in t.user_attrs and "mlflow_run_id" not in t.user_attrs
                    and str(number) not in logged):
                run = tracker.child(parent, f"trial {number}", "trial", dict(t.params),
                                    {"schedsearch.trial": number})
                tracker.end(run, "INTERRUPTED", "the worker stopped (killed, crashed or "
                            "interrupted) before this trial had an MLflow run; the trial was "
                            "marked failed", f"trial {number}")


def slot_seed(seed: int, stage: int, number: int) -> int:
    """The sampler seed of one slot: reproducible, and different for every slot, so workers
    sharing a study never draw the same points."""
    return (seed * 1_000_003 + stage * 10_007 + number) % (2 ** 31 - 1)


class Worker:
    """One process's part of the study: claim a slot, run it, repeat."""

    def __init__(self, studies: slots.Studies, ctx: Context, tracker: Tracker, parent: str,
                 opts: RunOptions, echo: Callable[[str], None] = print):
        self.studies, self.ctx, self.tracker, self.parent, self.opts = (
            studies, ctx, tracker, parent, opts)
        self.echo = echo
        self.space = Space(dict(ctx.config.space))
        self.multi = _multi(ctx.config)
        self._starts: Optional[list] = None

    def local_starts(self) -> list:
        """Where the local runs start. Read once: the local stage opens only when the global one
        is done, so its trials no longer change (and every local trial needs them)."""
        if self._starts is None:
            self._starts = local_starts(self.studies.trials, self.ctx.config)
        return self._starts

    def work(self, deadline: Optional[float]) -> None:
        """Claim and run slots until none is left — baselines, then the global stage (warm-start
        slots once the baselines are scored), then the local stage once the global one is done —
        then wait for other workers' slots (a dead worker's slot comes back after the grace period
        and is run here)."""
        st, config = self.studies, self.ctx.config
        done = sum(slots.finished_slots(s) for s in (st.trials, *st.local))
        self.bar = tqdm(total=config.trials, initial=min(done, config.trials), desc="trials",
                        unit="trial", disable=None if self.opts.progress else True,
                        dynamic_ncols=True)
        self._show_best()
        try:
            while deadline is None or time.time() < deadline:
                for study in st.all():
                    slots.fail_stale(study)
                if not self._step():
                    if not slots.busy(*st.all()):
                        return
                    time.sleep(min(5.0, max(0.5, self.opts.heartbeat)))
        finally:
            self.bar.close()

    def _say(self, text: str) -> None:
        """A line above the progress bar, through the study's echo (stderr under --json, whose
        stdout is the summary alone)."""
        with self.bar.external_write_mode():
            self.echo(text)

    def _step(self) -> bool:
        """Claim and run one slot; False when no slot can be claimed now."""
        st = self.studies
        slot = slots.claim(st.baselines, st.storage)
        if slot is not None:
            with slots.heartbeat(st.storage, slot.trial_id, self.opts.heartbeat):
                evaluate_baselines(slot, st.baselines, st.storage, self.ctx, self.tracker,
                                   self.parent, self._say)
            return True
        scored = not slots.busy(st.baselines)
        slot = slots.claim(st.trials, st.storage, accept=lambda a: scored or "warm" not in a)
        if slot is not None:
            self._trial(slot, stage=1)
            return True
        if slots.busy(st.trials):
            return False
        if not st.local and self.ctx.config.stages()[1]:
            # the global stage is done: it decides where the local runs start, and how many
            slots.open_local(st, self.ctx.config.local_runs(len(self.local_starts())),
                             self.opts.grace)
        for run, study in enumerate(st.local):   # one CMA-ES run after the other
            slot = slots.claim(study, st.storage)
            if slot is not None:
                self._trial(slot, stage=2, run=run)
                return True
        return False

    def _trial(self, slot: slots.Slot, stage: int, run: int = 0) -> None:
        st, config = self.studies, self.ctx.config
        seed = slot_seed(config.seed, stage + run, slot.number)
        if stage == 1:
            sampler = make_sampler(config.sampler, seed, self.multi)
            fixed = self._warm(slot.user_attrs["warm"]) if "warm" in slot.user_attrs else None
            # fewest_calls() <= budget: a space that cannot fill budget 1 is refused at 1
            nfe_range = ((self.space.fewest_calls(), config.budget)
                         if "nfe" in config.objectives else None)
            make = lambda trial: (self.space.suggest(trial, self.ctx.target, nfe_range), None)  # noqa: E731
            study, number = st.trials, slot.shown
        else:
            fixed, study = None, st.local[run]
            number = st.offsets[run] + slot.shown
            starts = self.local_starts()
            # a run without a start of its own (a study resumed with another config) refines
            # the best
            incumbent = starts[run] if run < len(starts) else starts[0] if starts else None
            if incumbent is None:   # nothing of the global stage completed: keep exploring
                sampler = make_sampler(config.sampler, seed, self.multi)
                make = lambda trial: (self.space.suggest(trial, self.ctx.target), None)  # noqa: E731
            else:
                sampler, params = refine_sampler(seed), dict(incumbent.params)
                make = lambda trial: self.space.refine(trial, params, self.ctx.target)  # noqa: E731
        trial = slots.open_trial(study, st.storage, slot, sampler=sampler, fixed=fixed)
        with slots.heartbeat(st.storage, slot.trial_id, self.opts.heartbeat):
            state = evaluate_trial(trial, study, self.ctx, self.tracker, self.parent, make,
                                   number, stage, self._say)
        self.bar.update(1)
        self._show_best()
        if state == "FAIL":
            reason = st.storage.get_trial(slot.trial_id).user_attrs.get("fail_reason")
            self._say(f"  trial {number} failed: {reason}")

    def _warm(self, k: int) -> Optional[dict]:
        """The k-th warm start: the best same-NFE baselines, each with every searched solver."""
        config, target = self.ctx.config, self.ctx.target
        scored = report.collect_baselines(self.studies, self.ctx.family)
        ranked = sorted((b for b in scored.values() if b["preset"].nfe == config.budget),
                        key=lambda b: b["fid"])[:config.warm_start]
        solvers_ = self.space.ranges["solver"]
        if k // len(solvers_) >= len(ranked):
            return None
        base = ranked[k // len(solvers_)]["preset"]
        params = self.space.warm_params(base, solvers_[k % len(solvers_)], target)
        if params is not None and "nfe" in config.objectives:
            params["nfe"] = config.budget
        return params

    def _show_best(self) -> None:
        if self.bar.disable:   # no bar (not a terminal): skip reading every trial back, ~15 ms
            return
        best = best_trial(self.studies, self.multi)
        if best is not None:
            fid, number = best
            self.bar.set_postfix_str(f"best FID {fid:.3f} (trial {number})")


def local_starts(study: optuna.Study, config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Where the local stage's CMA-ES runs start: the global stage's best trial, then the best
    free-form (``knots``) trial of each other solver, best first, while its search FID is within
    ``refine_margin`` of the best's, ``refine_starts`` at most (empty if nothing completed).

    Solvers and schedules interact, and which solver leads after the global stage says little
    about which leads once its σ list is refined: at 6 NFE on digits a UniPC start 2.5% behind
    the best DPM++(2M) one gave every study's winner (held-out 6.86 against 7.06). But a second
    run halves the first one's trials: at 5 NFE on digits one run of 61 trials beat two of 31
    and 30 in each of four studies (the second from a paper-family point 3% behind), and a start
    far behind (iPNDM 13% behind at 8 NFE) never led. A paper-family trial starts only the
    first run: in the ten benchmark studies with a paper-family run beside a free-form one (4
    and 5 NFE on digits), it gave one winner, the worst of its budget (docs/search.md)."""
    done = sorted(slots.trials_of(study, slots.COMPLETE), key=lambda t: (t.values[0], t.number))
    if not done:
        return []
    limit = done[0].values[0] + config.refine_margin * abs(done[0].values[0])
    free = "knots" in Space(dict(config.space)).ranges["family"]
    firsts = {done[0].params.get("solver"): done[0]}
    for t in done[1:]:
        if t.values[0] <= limit and not (free and t.params.get("family") == "paper"):
            firsts.setdefault(t.params.get("solver"), t)
    return list(firsts.values())[:config.refine_starts]


def best_trial(studies: slots.Studies, multi: bool = False) -> Optional[tuple[float, int]]:
    """(FID, shown trial number) of the best completed trial of both stages."""
    found = [(t.values[0], slots.slot_number(t) + off) for st, off in studies.numbered()
             for t in slots.trials_of(st, slots.COMPLETE)]
    return min(found) if found else None


def evaluate_baselines(slot: slots.Slot, study: optuna.Study, storage, ctx: Context,
                       tracker: Tracker, parent: str, echo) -> None:
    """Score the baselines of one slot and log each like a trial."""
    keys = list(slot.user_attrs["baselines"])
    try:
        built = baselines.build(ctx, keys, echo)
        results, runs = {}, []
        for key in keys:
            preset = built.get(key)
            if preset is None:
                continue
            res = ctx.score(preset, keep_images=16)
            results[key] = {"preset": preset.to_json(), **report.result_json(res)}
            # a slot of two baselines (GITS, OSS) stopped after the first had logged its run
            # (Ctrl-C, a kill) runs again whole: that earlier run is superseded, not a second one
            while (stale := tracker.find_child(parent, "baseline", preset.name)) is not None:
                tracker.end(stale, "INTERRUPTED", SUPERSEDED)
            runs.append(tracker.child(parent, preset.name, "baseline", run_params(preset)))
            tracker.finish(runs[-1], preset, res, "COMPLETE")
            echo(f"  baseline {preset.name:<34} NFE {preset.nfe:>3}  FID {res.fid:8.3f}")
    except Exception as exc:   # the baseline's own failure: reported, not retried
        with _unless_taken_over(echo, f"baseline {', '.join(keys)}"):
            storage.set_trial_user_attr(slot.trial_id, "fail_reason",
                                        f"{type(exc).__name__}: {exc}")
            study.tell(slot.number, state=optuna.trial.TrialState.FAIL)
        echo(f"  baseline {', '.join(keys)} failed: {exc}")
        return
    except BaseException:      # interrupted: back in the queue for the next worker
        with _unless_taken_over(echo, f"baseline {', '.join(keys)}"):
            study.tell(slot.number, state=optuna.trial.TrialState.FAIL)
            slots.requeue(study, slot.number)
        raise
    with _unless_taken_over(echo, f"baseline {', '.join(keys)}") as told:
        storage.set_trial_user_attr(slot.trial_id, "results", results)
        if results:
            study.tell(slot.number, min(r["fid"] for r in results.values()))
        else:   # none of the group applies (GITS/OSS at a budget the teacher cannot beat):
            # skipped, not failed; telling Optuna NaN made it warn and fail the slot
            study.tell(slot.number, state=optuna.trial.TrialState.PRUNED)
    if told.taken_over:
        for run in runs:
            tracker.end(run, "INTERRUPTED", TAKEN_OVER)


SUPERSEDED = ("its slot was interrupted before the slot's other baselines were scored and ran "
              "again; the run of that re-run is the result")
TAKEN_OVER = ("the slot was taken over by another worker (no heartbeat within the grace "
              "period); this result was dropped, and the re-queued slot's run is the result")


@contextlib.contextmanager
def _unless_taken_over(echo, what: str):
    """A slot this worker held too long without a heartbeat (a stalled machine) was failed and
    re-queued by another worker: its result is dropped — the re-queued copy runs — instead of
    stopping this worker. Yields an outcome whose ``taken_over`` says so afterwards, so the
    slot's MLflow runs can say so too (else the dashboard shows the dropped result as a finished
    trial beside the re-queued copy's)."""
    outcome = SimpleNamespace(taken_over=False)
    try:
        yield outcome
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
        if "finished" not in str(exc).lower() and "cannot tell" not in str(exc).lower():
            raise
        outcome.taken_over = True
        _say_taken_over(echo, what)


def _say_taken_over(echo, what: str) -> None:
    echo(f"  {what}: the slot was taken over by another worker (no heartbeat within the grace "
         f"period); this result is dropped, the re-queued slot runs instead")


def evaluate_trial(trial: optuna.Trial, study: optuna.Study, ctx: Context, tracker: Tracker,
                   parent: str, make: Callable, number: int, stage: int,
                   echo: Callable[[str], None] = print) -> str:
    """Build the trial's preset (``make(trial) -> (preset, absolute params or None)``), score it
    (pruning on nested subsets), log it; returns the trial's final state name. ``number`` is the
    shown one; ``echo`` the worker's (stderr under --json)."""
    config, multi = ctx.config, _multi(ctx.config)
    run = None
    try:
        preset, params = make(trial)
        preset = preset.replace(name=f"trial {number}")
        trial.set_user_attr("candidate", {**preset.to_json(), "stage": stage,
                                          **({"params": params} if params else {})})
        run = tracker.child(parent, preset.name, "trial",
                            {**(params or trial.params), **run_params(preset)},
                            {"schedsearch.trial": number, "schedsearch.stage": stage})
        trial.set_user_attr("mlflow_run_id", run)

        partial: dict = {}

        def on_checkpoint(n, fid):
            if multi or n >= config.n_search:
                return  # the full-n value is the objective, not an intermediate one
            partial[n] = fid
            trial.report(fid, n)
            if trial.should_prune():
                raise optuna.TrialPruned(f"FID {fid:.3f} at n = {n} is worse than the median "
                                         f"of earlier trials")

        res = ctx.score(preset, on_checkpoint=on_checkpoint)
    except optuna.TrialPruned as exc:
        tracker.log_series(run, "fid_partial", partial)
        with _unless_taken_over(echo, f"trial {number}"):   # where its time went, for the cost
            trial.set_user_attr("seconds", ctx.scorer("search", preset.guidance).last_seconds)
        return _end(study, trial, tracker, run, "PRUNED", str(exc), f"trial {number}", echo)
    except optuna.exceptions.UpdateFinishedTrialError:
        # taken over mid-trial (a checkpoint's report found the slot failed and re-queued by
        # another worker): stop here, not re-queue it again, and go on with the next slot
        _say_taken_over(echo, f"trial {number}")
        if run:
            tracker.end(run, "INTERRUPTED", TAKEN_OVER, f"trial {number}")
        return "INTERRUPTED"
    except (ScoreError, solvers.NonFiniteError, ValueError) as exc:
        return _end(study, trial, tracker, run, "FAIL", str(exc), f"trial {number}", echo)
    except BaseException as exc:  # interrupted: nothing left RUNNING, the slot back in the queue
        _end(study, trial, tracker, run, "INTERRUPTED", f"{type(exc).__name__}: {exc}",
             f"trial {number}", echo)
        with _unless_taken_over(echo, f"trial {number}"):
            slots.requeue(study, trial.number)
        raise
    values = [res.fid] + ([res.clip] if "clip" in config.objectives else
                          [float(preset.nfe)] if multi else [])
    with _unless_taken_over(echo, f"trial {number}") as told:
        trial.set_user_attr("result", report.result_json(res))
        study.tell(trial, values if multi else values[0])
    if told.taken_over:
        tracker.end(run, "INTERRUPTED", TAKEN_OVER, f"trial {number}")
        return "INTERRUPTED"
    tracker.finish(run, preset, res, "COMPLETE")
    return "COMPLETE"


def _end(study, trial, tracker: Tracker, run: Optional[str], state: str, reason: str,
         name: Optional[str] = None, echo: Callable[[str], None] = print) -> str:
    """Tell Optuna and MLflow how a trial ended without a score."""
    optuna_state = (optuna.trial.TrialState.PRUNED if state == "PRUNED"
                    else optuna.trial.TrialState.FAIL)
    with _unless_taken_over(echo, name or f"trial {trial.number}") as told:
        if state == "FAIL":   # a reason: the slot counts as done (interrupted ones are re-run)
            trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna_state)
    if told.taken_over:
        state, reason = "INTERRUPTED", TAKEN_OVER
    if run:
        tracker.end(run, state, reason, name)
    return state
