"""``schedsearch run``: a study from config to preset.

config → model + prompt subsets + scorer → baselines (once per study) → trials (Optuna slots, see
``search``) → held-out re-scoring of the winner and every baseline → preset + MLflow comparison.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import optuna
import yaml

from . import __version__, presets, search, solvers
from .freeu import FreeUPlan
from .search import Candidate, Space

ALL_BASELINES = ("karras", "karras20", "paper", "ays", "gits", "oss")


@dataclass
class StudyConfig:
    """Everything a study needs; ``studies/*.yaml`` files hold these keys (CLI flags override)."""

    model: str = "digits"
    budget: int = 5
    guidance: Optional[float] = None        # None: the model family's usual value
    prompts: Optional[str] = None           # None: the testbed's classes; a file for SD models
    caption_column: str = "caption"
    prompt_seed: int = 0
    n_search: int = 200
    n_heldout: int = 200
    checkpoints: Optional[list] = None      # growing subset sizes for pruning; None: n/4, n/2, n
    batch_size: int = 200
    trials: int = 32
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    objectives: list = field(default_factory=lambda: ["fid"])
    space: dict = field(default_factory=dict)
    baselines: list = field(default_factory=lambda: list(ALL_BASELINES))
    teacher_steps: int = 100
    distill_samples: int = 16
    ref_stats: Optional[str] = None
    extractor: Optional[str] = None
    inception: Optional[str] = None
    clip: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1 (model calls per image), got {self.budget!r}")
        for key in ("n_search", "n_heldout", "batch_size", "trials"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        bad = [b for b in self.baselines if b not in ALL_BASELINES]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {', '.join(ALL_BASELINES)}")
        objs = list(self.objectives)
        if objs[:1] != ["fid"] or not set(objs) <= {"fid", "nfe", "clip"} or len(objs) > 2:
            raise ValueError(f"objectives must be [fid], [fid, nfe] or [fid, clip], got {objs}")
        if "clip" in objs and not self.clip:
            raise ValueError("the clip objective needs local CLIP weights: set clip: /path/to/clip")
        if self.pruner not in ("median", "none"):
            raise ValueError(f"pruner must be median or none, got {self.pruner!r}")
        Space(dict(self.space))  # validates the ranges now, not at trial 1
        if self.checkpoints is not None:
            cps = sorted(int(c) for c in self.checkpoints)
            if not cps or cps[0] < 2 or cps[-1] > self.n_search:
                raise ValueError(f"checkpoints must lie in [2, n_search={self.n_search}], got {cps}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "StudyConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"study config {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a study config is a mapping of keys to values")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown study config keys: {', '.join(sorted(unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def resolved_checkpoints(self) -> list[int]:
        if self.checkpoints:
            return sorted({int(c) for c in self.checkpoints} | {self.n_search})
        n = self.n_search
        return sorted({max(2, n // 4), max(2, n // 2), n})

    # the keys that define what a study measures; resuming with other values is refused
    IDENTITY = ("model", "budget", "guidance", "prompts", "caption_column", "prompt_seed",
                "n_search", "n_heldout", "objectives", "space", "ref_stats", "extractor",
                "height", "width")


def default_study_name(config: StudyConfig) -> str:
    tag = Path(config.model.rstrip("/")).name.replace(".safetensors", "") or "model"
    return f"{tag}-{config.budget}nfe"


# -- evaluation -----------------------------------------------------------------------------------
@dataclass
class Entry:
    """Anything we score: a trial's candidate or a baseline."""

    name: str
    sigmas: object
    solver: str
    plan: Optional[FreeUPlan]
    guidance: float
    spec: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return solvers.model_calls(self.solver, self.sigmas)

    def describe(self) -> dict:
        return {"name": self.name, "nfe": self.nfe, "solver": self.solver,
                "sigmas": [float(s) for s in self.sigmas], "guidance": self.guidance,
                "freeu": self.plan.to_json() if self.plan is not None else None,
                "schedule": self.spec, **self.extra}

    def preset(self, name: str, family: str, provenance: dict) -> presets.Preset:
        return presets.Preset(name=name, family=family if family in presets.FAMILIES else "any",
                              sigmas=self.sigmas, solver=self.solver, freeu=self.plan,
                              guidance=self.guidance, schedule=self.spec, provenance=provenance)


class Context:
    """The loaded model, prompt subsets and scorers of one study in one process."""

    def __init__(self, config: StudyConfig, echo: Callable[[str], None] = print):
        from . import models, prompts as prompt_sets
        from .metrics import scoring_setup

        self.config = config
        kwargs = {k: getattr(config, k) for k in ("height", "width") if getattr(config, k)}
        echo(f"loading model {config.model} ...")
        self.model = models.load(config.model, device=config.device, dtype=config.dtype, **kwargs)
        self.family = getattr(self.model, "family", "any")
        self.guidance = (config.guidance if config.guidance is not None
                         else models.default_guidance(self.model))
        source = self.prompt_source = config.prompts or models.default_prompts(self.model)
        self.search_set, self.heldout_set = prompt_sets.split(
            source, config.n_search, config.n_heldout, config.prompt_seed,
            caption_column=config.caption_column)
        self.freeu_ok = getattr(self.model, "unet", None) is not None
        self.extractor, self.ref = scoring_setup(self.model, config)
        self.clip = None
        if config.clip:
            from .metrics.features import ClipScore
            self.clip = ClipScore(config.clip, device=self.model.device)
        self.artifacts = True       # plots, sample grids and preset JSON per run (--no-artifacts)
        self._scorers: dict = {}

    def scorer(self, which: str, guidance: float):
        from .metrics.score import Scorer

        key = (which, guidance)
        if key not in self._scorers:
            pset = self.search_set if which == "search" else self.heldout_set
            cps = self.config.resolved_checkpoints() if which == "search" else (len(pset),)
            self._scorers[key] = Scorer(self.model, self.extractor, self.ref, pset,
                                        guidance=guidance, batch_size=self.config.batch_size,
                                        checkpoints=tuple(cps), clip=self.clip)
        return self._scorers[key]

    def score(self, entry: Entry, which: str = "search", on_checkpoint=None, keep_images: int = 0):
        return self.scorer(which, entry.guidance).score(
            entry.sigmas, solver=entry.solver, freeu=entry.plan, on_checkpoint=on_checkpoint,
            keep_images=keep_images)

    def provenance(self) -> dict:
        return presets.provenance(
            model=self.config.model, model_fingerprint=self.model.fingerprint(),
            prompts=self.search_set.as_json(), heldout=self.heldout_set.as_json(),
            extractor=getattr(self.extractor, "name", str(self.extractor)))


def trial_entry(ctx: Context, trial_params: dict, budget: int) -> tuple[Candidate, Entry]:
    cand = Candidate.from_params(trial_params, budget, ctx.guidance)
    entry = Entry(name="trial", sigmas=cand.sigmas(ctx.model.table), solver=cand.solver,
                  plan=cand.plan(), guidance=cand.guidance, spec=cand.schedule_spec())
    return cand, entry


# -- the run --------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    out: Path
    storage: Optional[str] = None
    study_name: Optional[str] = None
    timeout: Optional[float] = None
    heartbeat: float = 10.0
    grace: float = 30.0
    progress: bool = True
    artifacts: bool = True
    export_user_preset: bool = True


@dataclass
class Studies:
    """The study's two slot queues in one storage: trials, and baselines (``<name>:baselines``,
    one slot per baseline, GITS and OSS sharing one because they share a teacher). Both go through
    the same claim / heartbeat / stale-recovery path, so with many workers every baseline is scored
    once and the trial numbers count trials only."""

    trials: optuna.Study
    baselines: optuna.Study
    storage: object

    def all(self):
        return (self.baselines, self.trials)


def run_study(config: StudyConfig, opts: RunOptions, echo: Callable[[str], None] = print) -> dict:
    from .tracking import Tracker, tracking_uri_for

    t_start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or default_study_name(config)
    storage_url = opts.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = search.make_storage(storage_url, opts.heartbeat, opts.grace)
    ctx = Context(config, echo)
    ctx.artifacts = opts.artifacts
    studies = open_studies(storage, name, ctx)

    tracker = Tracker(tracking_uri_for(out), name, out / "mlartifacts")
    parent = tracker.study_run(name, {"config": json.dumps(search.config_json(config)),
                                      "storage": _redact(storage_url), **ctx.provenance()},
                               {"schedsearch.version": __version__, "schedsearch.budget": config.budget})
    recover(studies, tracker, parent)

    echo(f"study {name}: {config.trials} trials at {config.budget} NFE on {ctx.model.name} "
         f"({len(ctx.search_set)} search images, {len(ctx.heldout_set)} held-out)")
    echo(f"  storage {_redact(storage_url)}; MLflow {tracker.uri}")
    deadline = None if not opts.timeout else time.time() + opts.timeout
    work(studies, ctx, tracker, parent, opts, deadline, echo)
    recover(studies, tracker, parent)   # runs of workers that died while this one waited
    summary = finalize(studies, ctx, tracker, parent, opts, name, echo)
    summary["seconds"] = round(search.elapsed(t_start), 1)
    return summary


def _redact(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}"
    return url


def _create_or_load(storage, name: str, **kwargs) -> tuple[optuna.Study, bool]:
    try:
        return optuna.create_study(storage=storage, study_name=name, **kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        kwargs.pop("directions", None)
        return optuna.load_study(study_name=name, storage=storage, **kwargs), False


def open_studies(storage, name: str, ctx: "Context") -> Studies:
    config = ctx.config
    multi = len(config.objectives) > 1
    directions = ["minimize"] + (["maximize"] if "clip" in config.objectives else
                                 ["minimize"] if multi else [])
    sampler = search.make_sampler(config.sampler, config.seed, multi)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)
              if config.pruner == "median" and not multi else optuna.pruners.NopPruner())
    ident = {k: search.config_json(config)[k] for k in StudyConfig.IDENTITY}
    study, created = _create_or_load(storage, name, directions=directions, sampler=sampler,
                                     pruner=pruner)
    if created:
        study.set_user_attr("identity", ident)
        study.set_user_attr("config", search.config_json(config))
        study.set_user_attr("schedsearch_version", __version__)
    else:
        stored = _wait_for(lambda: study.user_attrs.get("identity"), 60)
        if stored is not None and stored != ident:
            diff = {k: (stored.get(k), ident.get(k)) for k in ident if stored.get(k) != ident.get(k)}
            raise ValueError(
                f"study {name!r} already exists with a different setup: "
                + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + ". Re-run with the same settings to continue it, or pass --study-name NEW.")
    base, _ = _create_or_load(storage, f"{name}:baselines", directions=["minimize"],
                              sampler=optuna.samplers.RandomSampler(seed=0))
    studies = Studies(study, base, storage)
    ensure_slots(studies, ctx, created)
    return studies


def _wait_for(get, seconds: float):
    deadline = time.time() + seconds
    while True:
        v = get()
        if v is not None or time.time() > deadline:
            return v
        time.sleep(0.5)


def baseline_groups(keys) -> list[list[str]]:
    groups = [[k] for k in keys if k not in ("gits", "oss")]
    distilled = [k for k in ("gits", "oss") if k in keys]
    return groups + ([distilled] if distilled else [])


def ensure_slots(studies: Studies, ctx: "Context", created: bool) -> None:
    """The creator enqueues all trial slots, the first two holding the paper's preset and its
    schedule alone (see ``search.seed_trials``); a re-run that
    asks for more trials adds the difference (extend a study from one worker at a time). Baseline
    slots are added for every requested baseline that has none yet."""
    config, study = ctx.config, studies.trials
    if not created:
        slots = _wait_for(lambda: study.user_attrs.get("slots"), 60)
        if slots is not None and config.trials > slots:
            for _ in range(config.trials - slots):
                study.enqueue_trial({})
            study.set_user_attr("slots", config.trials)
        elif slots is None:
            if study.get_trials(deepcopy=False):
                raise ValueError(f"study {study.study_name!r} has trials but no slot count; it was "
                                 f"not created by schedsearch run")
            created = True  # the creator died before enqueuing: take over
    if created:
        seeds = []
        if "nfe" not in config.objectives:
            seeds = search.seed_trials(ctx.family, config.budget, ctx.freeu_ok,
                                       Space(dict(config.space)))[:config.trials]
        for why, params in zip(("paper preset", "paper schedule, DPM++2M, no FreeU"), seeds):
            study.enqueue_trial(params, user_attrs={"seeded_from": why})
        for _ in range(config.trials - len(seeds)):
            study.enqueue_trial({})
        study.set_user_attr("slots", config.trials)
    have = {tuple(t.user_attrs.get("baselines", ())) for t in studies.baselines.get_trials(deepcopy=False)}
    for group in baseline_groups(config.baselines):
        if tuple(group) not in have:
            studies.baselines.enqueue_trial({}, user_attrs={"baselines": group})


def _family_of(model_spec: str) -> str:
    """A model family from a spec alone (for presets exported without loading the model)."""
    if model_spec in ("digits", "gmm"):
        return model_spec
    return "sdxl" if "xl" in model_spec.lower() else "sd15"


def recover(studies: Studies, tracker, parent: str) -> None:
    """Fail slots whose worker died (stale heartbeat; they are re-queued) and end their MLflow runs."""
    running = []
    for st in studies.all():
        search.fail_stale(st)
        running += [t.user_attrs.get("mlflow_run_id") for t in
                    st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    tracker.close_orphans(parent, [r for r in running if r])
    # A worker killed between claiming a trial and creating its MLflow run leaves no run to close:
    # log one, so the dashboard shows every interrupted trial, as Optuna does.
    logged = {r.data.tags.get("schedsearch.trial") for r in tracker.children(parent)}
    for t in studies.trials.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if "fail_reason" not in t.user_attrs and str(t.number) not in logged:
            run = tracker.child(parent, f"trial {t.number}", "trial", dict(t.params),
                                {"schedsearch.trial": t.number})
            tracker.end(run, "INTERRUPTED", "the worker stopped (killed, crashed or interrupted) "
                        "before this trial had an MLflow run; the trial was marked failed")


def work(studies: Studies, ctx: Context, tracker, parent, opts: RunOptions,
         deadline: Optional[float], echo) -> None:
    """Claim and run slots until none is left — baselines first, then trials — then wait for
    other workers' slots (a dead worker's slot comes back after the grace period and is run here)."""
    from tqdm.auto import tqdm

    config = ctx.config
    multi = len(config.objectives) > 1
    bar = tqdm(total=config.trials, initial=min(search.finished_slots(studies.trials), config.trials),
               desc="trials", unit="trial", disable=not opts.progress, dynamic_ncols=True)
    _set_best(bar, studies.trials, multi)
    space = Space(dict(config.space))
    try:
        while deadline is None or time.time() < deadline:
            for st in studies.all():
                search.fail_stale(st)
            slot = search.claim(studies.baselines, studies.storage)
            if slot is not None:
                with search.Heartbeat(studies.storage, slot._trial_id, opts.heartbeat):
                    evaluate_baselines(slot, studies.baselines, ctx, tracker, parent, bar.write)
                continue
            trial = search.claim(studies.trials, studies.storage)
            if trial is not None:
                with search.Heartbeat(studies.storage, trial._trial_id, opts.heartbeat):
                    state = evaluate_trial(trial, studies.trials, ctx, tracker, parent, space, multi)
                bar.update(1)
                _set_best(bar, studies.trials, multi)
                if state == "FAIL":
                    reason = studies.storage.get_trial(trial._trial_id).user_attrs.get("fail_reason")
                    bar.write(f"  trial {trial.number} failed: {reason}")
                continue
            if not any(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       for st in studies.all()):
                return
            time.sleep(min(5.0, max(0.5, opts.heartbeat)))
    finally:
        bar.close()


def evaluate_baselines(slot, study, ctx: Context, tracker, parent, echo) -> None:
    """Score the baselines of one slot and log each like a trial."""
    from .baselines import build_baselines

    keys = list(slot.user_attrs["baselines"])
    try:
        entries = build_baselines(ctx, keys, echo)
        results = {}
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            res = ctx.score(entry, keep_images=16)
            results[key] = {**entry.describe(), **_result_json(res)}
            run = tracker.child(parent, entry.name, "baseline", _entry_params(entry))
            _log_result(tracker, run, entry, res, ctx)
            tracker.end(run, "COMPLETE")
            echo(f"  baseline {entry.name:<34} NFE {entry.nfe:>3}  FID {res.fid:8.3f}")
    except BaseException as exc:
        slot.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
        study.tell(slot, state=optuna.trial.TrialState.FAIL)
        if isinstance(exc, Exception):
            echo(f"  baseline {', '.join(keys)} failed: {exc}")
            return
        raise
    slot.set_user_attr("results", results)
    study.tell(slot, min((r["fid"] for r in results.values()), default=float("nan")))


def _entry_params(entry: Entry) -> dict:
    return {"solver": entry.solver, "nfe": entry.nfe, "guidance": entry.guidance,
            "sigmas": json.dumps([round(float(s), 6) for s in entry.sigmas]),
            "freeu": entry.plan.describe() if entry.plan is not None else "off",
            "schedule": json.dumps(entry.spec) if entry.spec else None, **entry.extra}


def _result_json(res) -> dict:
    d = res.as_dict()
    return {k: d[k] for k in ("fid", "kid", "n", "fid_at", "nfe", "seconds", "clip") if k in d}


def _log_result(tracker, run, entry: Entry, res, ctx: Context, preset_name: str | None = None):
    from . import plots
    from .images import grid

    metrics = {"fid": res.fid, "kid": res.kid, "nfe": entry.nfe}
    if getattr(res, "clip", None) is not None:
        metrics["clip"] = res.clip
    metrics.update({f"seconds_{k}": v for k, v in res.seconds.items()})
    tracker.log_metrics(run, metrics)
    tracker.log_series(run, "fid_partial", res.fid_at)
    if not ctx.artifacts:
        return
    tracker.log_figure(run, plots.schedules({entry.name: [float(s) for s in entry.sigmas]},
                                            title=f"{entry.name}: σ schedule"), "schedule.png")
    images = getattr(res, "images", None)
    if images is not None and len(images):
        if images.ndim == 4:
            scale = max(1, 128 // images.shape[-1])
            tracker.log_image(run, grid(images, nrow=8, scale=scale), "samples.png")
        else:
            tracker.log_figure(run, plots.scatter(images.numpy()), "samples.png")
    preset = entry.preset(preset_name or entry.name, ctx.family, ctx.provenance())
    tracker.log_json(run, preset.to_json(), "preset.json")
    if images is not None and len(images):
        # the exact first images, so anyone can check a preset reproduces them bit for bit
        tracker.log_tensors(run, {"images": images.contiguous()}, "samples.safetensors",
                            {"prompts": json.dumps(list(map(str, ctx.search_set.prompts[:len(images)]))),
                             "seeds": json.dumps(list(ctx.search_set.seeds[:len(images)]))})


def _set_best(bar, study, multi):
    try:
        if multi:
            bar.set_postfix_str(f"pareto front {len(study.best_trials)}")
        else:
            bar.set_postfix_str(f"best FID {study.best_value:.3f} (trial {study.best_trial.number})")
    except ValueError:
        pass


def evaluate_trial(trial, study, ctx: Context, tracker, parent, space: Space, multi: bool) -> str:
    from .metrics.score import ScoreError

    config = ctx.config
    nfe_range = (1, config.budget) if "nfe" in config.objectives else None
    run = None
    try:
        space.suggest(trial, config.budget, ctx.guidance, ctx.freeu_ok, nfe_range)
        _, entry = trial_entry(ctx, trial.params, config.budget)
        entry.name = f"trial {trial.number}"
        trial.set_user_attr("candidate", entry.describe())
        run = tracker.child(parent, entry.name, "trial", {**trial.params, **_entry_params(entry)},
                            {"schedsearch.trial": trial.number})
        trial.set_user_attr("mlflow_run_id", run)

        def report(n, fid):
            if multi or n >= config.n_search:
                return  # the full-n value is the objective, not an intermediate one
            trial.report(fid, n)
            tracker.log_metrics(run, {"fid_partial": fid}, step=int(n))
            if trial.should_prune():
                raise optuna.TrialPruned(f"FID {fid:.3f} at n = {n} is worse than the median "
                                         f"of earlier trials")

        res = ctx.score(entry, on_checkpoint=report, keep_images=16)
    except optuna.TrialPruned as exc:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        if run:
            tracker.end(run, "PRUNED", str(exc))
        return "PRUNED"
    except (ScoreError, solvers.NonFiniteError, ValueError) as exc:
        trial.set_user_attr("fail_reason", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if run:
            tracker.end(run, "FAIL", str(exc))
        return "FAIL"
    except BaseException as exc:  # interrupted: leave nothing RUNNING behind
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if run:
            tracker.end(run, "INTERRUPTED", f"{type(exc).__name__}: {exc}")
        raise
    values = [res.fid] + ([res.clip] if "clip" in config.objectives else
                          [float(entry.nfe)] if multi else [])
    trial.set_user_attr("result", _result_json(res))
    _log_result(tracker, run, entry, res, ctx, preset_name=f"{study.study_name}-trial{trial.number}")
    study.tell(trial, values if multi else values[0])
    tracker.end(run, "COMPLETE")
    return "COMPLETE"


def collect_baselines(studies: Studies) -> dict:
    """key → stored result of every baseline that was scored."""
    out = {}
    for t in studies.baselines.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        out.update(t.user_attrs.get("results", {}))
    order = {k: i for i, k in enumerate(ALL_BASELINES)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 99)))


def finalize(studies: Studies, ctx: Context, tracker, parent, opts: RunOptions, name: str,
             echo) -> dict:
    from . import plots
    from .tracking import ROLE

    config = ctx.config
    study = studies.trials
    baselines = collect_baselines(studies)
    multi = len(config.objectives) > 1
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    c = search.counts(study)
    summary = {"study": name, "budget": config.budget, "trials": c, "model": config.model,
               "out": str(opts.out), "rows": []}
    if not complete:
        echo("no trial completed yet; nothing to compare")
        return summary

    winners = study.best_trials if multi else [study.best_trial]
    best = min(winners, key=lambda t: t.values[0])
    _, best_entry = trial_entry(ctx, best.params, config.budget)
    best_entry.name = f"best (trial {best.number})"

    heldout = {}
    for key, entry in [("best", best_entry)] + [(k, _entry_from_json(v)) for k, v in baselines.items()]:
        attr = f"heldout:{key}" if key != "best" else f"heldout:trial{best.number}"
        stored = study.user_attrs.get(attr)
        if stored is None:
            res = ctx.score(entry, which="heldout")
            stored = {"fid": res.fid, "kid": res.kid, "n": res.n}
            study.set_user_attr(attr, stored)
        heldout[key] = stored

    rows = [{"name": best_entry.name, "key": "best", "nfe": best_entry.nfe,
             "fid": best.values[0], "fid_heldout": heldout["best"]["fid"],
             "kid_heldout": heldout["best"]["kid"], "solver": best_entry.solver}]
    for key, b in baselines.items():
        rows.append({"name": b["name"], "key": key, "nfe": b["nfe"], "fid": b["fid"],
                     "fid_heldout": heldout[key]["fid"], "kid_heldout": heldout[key]["kid"],
                     "solver": b["solver"]})
    summary["rows"] = rows
    summary["best_trial"] = best.number
    summary["best_params"] = best.params
    if multi:
        summary["pareto_front"] = [{"trial": t.number, "values": t.values, "params": t.params}
                                   for t in study.best_trials]

    # The recommendation: the searched winner, unless a baseline spending the same NFE scored
    # better on the search subset. Chosen on the search subset, never on held-out, so the held-out
    # column stays an honest check; the user never gets a preset that loses to a known schedule.
    same_nfe = [r for r in rows if r["key"] == "best" or r["nfe"] == best_entry.nfe]
    pick = min(same_nfe, key=lambda r: r["fid"])
    pick["recommended"] = True
    summary["recommended"] = pick["key"]
    entry = best_entry if pick["key"] == "best" else _entry_from_json(baselines[pick["key"]])

    # the preset: written next to the study and, by name, to the user preset folder
    scores = {"fid_search": pick["fid"], "fid_heldout": pick["fid_heldout"],
              "kid_heldout": pick["kid_heldout"]}
    origin = ({"trial": best.number, "params": best.params} if pick["key"] == "best" else
              {"baseline": pick["key"], "best_trial": best.number,
               "note": "a baseline beat every searched schedule at this NFE on the search subset"})
    prov = {**ctx.provenance(), "study": name, **origin, "scores": scores}
    preset = entry.preset(name, ctx.family, prov)
    preset_path = preset.save(Path(opts.out) / f"{name}.preset.json")
    summary["preset"] = str(preset_path)
    if opts.export_user_preset:
        summary["user_preset"] = str(preset.save(presets.user_dir() / f"{name}.json"))

    # the parent run: comparison table and figures
    table = comparison_markdown(rows)
    (Path(opts.out) / "comparison.md").write_text(table + "\n", encoding="utf-8")
    tracker.log_text(parent, table, "comparison.md")
    tracker.log_json(parent, summary, "summary.json")
    tracker.log_file(parent, preset_path, "preset")
    tracker.log_metrics(parent, {"best_fid": best.values[0], "best_fid_heldout": heldout["best"]["fid"],
                                 **{f"{r['key']}_fid_heldout": r["fid_heldout"] for r in rows[1:]}})
    best_run = best.user_attrs.get("mlflow_run_id")
    for run in tracker.children(parent):  # a resumed study may have a new winner
        if run.data.tags.get(ROLE) == "best" and run.info.run_id != best_run:
            tracker.tag(run.info.run_id, {ROLE: "trial", "schedsearch.best": "false"})
    if best_run:
        tracker.tag(best_run, {ROLE: "best", "schedsearch.best": "true"})
    rec_run = best_run if pick["key"] == "best" else tracker.find_child(parent, "baseline", pick["name"])
    if rec_run:
        tracker.tag(rec_run, {"schedsearch.recommended": "true"})
    if opts.artifacts:
        trials = [(t.number, t.values[0]) for t in complete]
        tracker.log_figure(parent, plots.fid_vs_trial(
            trials, {b["name"]: b["fid"] for b in baselines.values()}), "fid_vs_trial.png")
        curves = {best_entry.name: [float(s) for s in best_entry.sigmas]}
        curves.update({b["name"]: b["sigmas"] for b in baselines.values()})
        tracker.log_figure(parent, plots.schedules(curves, "winner vs baselines",
                                                   highlight=best_entry.name), "schedules.png")
        imp = importances(study)
        if imp:
            tracker.log_figure(parent, plots.importance(imp), "importance.png")
            summary["importance"] = imp
    if not any(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,
                                                     optuna.trial.TrialState.RUNNING))
               for st in studies.all()):
        tracker.client.set_terminated(parent, "FINISHED")
    (Path(opts.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n",
                                                 encoding="utf-8")
    return summary


def importances(study) -> dict:
    """fANOVA importances, or {} when too few trials share parameters to say anything."""
    try:
        if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 4:
            return {}
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        with warnings.catch_warnings():  # "few trials in a regime": the plot says as much
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(
                study, target=target).items()}
    except (RuntimeError, ValueError):
        return {}


def _entry_from_json(d: dict) -> Entry:
    return Entry(name=d["name"], sigmas=d["sigmas"], solver=d["solver"],
                 plan=FreeUPlan.from_json(d["freeu"]) if d.get("freeu") else None,
                 guidance=d["guidance"], spec=d.get("schedule"))


def comparison_markdown(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["key"] == "karras"), None)
    head = "| schedule | NFE | solver | FID (search) | FID (held-out) | KID (held-out) |"
    if ref:
        head += " held-out vs Karras@budget |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {'★ ' if r.get('recommended') else ''}{r['name']} | {r['nfe']} | {r['solver']} | {r['fid']:.3f} | "
                f"{r['fid_heldout']:.3f} | {r['kid_heldout']:.4f} |")
        if ref:
            line += f" {r['fid_heldout'] / ref['fid_heldout']:.2f}× |"
        lines.append(line)
    return "\n".join(lines)


def preset_from_study(storage_url: str, study_name: str, name: str, trial_number: int | None = None
                      ) -> presets.Preset:
    """Rebuild a trial's preset from the study storage alone (no model needed)."""
    storage = search.make_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ValueError(f"no study named {study_name!r} in {_redact(storage_url)}") from None
    if trial_number is None:
        try:
            trial = min(study.best_trials, key=lambda t: t.values[0])
        except ValueError:
            raise ValueError(f"study {study_name!r} has no completed trial yet") from None
    else:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not matches or matches[0].state != optuna.trial.TrialState.COMPLETE:
            raise ValueError(f"trial {trial_number} of {study_name!r} did not complete")
        trial = matches[0]
    cfg = study.user_attrs.get("config", {})
    heldout = study.user_attrs.get(f"heldout:trial{trial.number}")
    scores = {"fid_search": trial.values[0], **({"fid_heldout": heldout["fid"],
                                                 "kid_heldout": heldout["kid"]} if heldout else {})}
    return _entry_from_json(trial.user_attrs["candidate"]).preset(
        name, _family_of(cfg["model"]) if cfg.get("model") else "any",
        presets.provenance(study=study_name, trial=trial.number, scores=scores, params=trial.params,
                           model=cfg.get("model"), config=cfg))
