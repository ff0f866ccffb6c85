"""The study: an Optuna search over the paper's schedule space at a fixed NFE budget.

A candidate is (p1, p2, stop, final denoise, solver, FreeU start t_aug and b1, b2, s1, s2, FreeU
variant[, guidance]). Its σ list always spends exactly the budget: with a final denoise the paper
schedule gets budget − 1 steps and σ = 0 is appended, so no candidate can miss the budget.

Trials are *slots*: the worker that creates the study enqueues exactly ``trials`` WAITING trials
(the first holds the paper's preset), and every worker — in this process or on other machines
sharing the storage — only claims WAITING slots (an atomic WAITING → RUNNING transition in the
storage) and never creates trials. So N workers finish exactly the requested number of trials with
no duplicates. A trial whose worker dies stops sending heartbeats; after the grace period another
worker (or the same command, re-run) marks it FAIL, closes its MLflow run, and re-queues its
parameters as a fresh slot.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import optuna

from . import schedules, solvers
from .freeu import FreeU, FreeUPlan

optuna.logging.set_verbosity(optuna.logging.WARNING)

FREEU_KEYS = ("b1", "b2", "s1", "s2")

DEFAULT_SPACE = {
    "p1": [2.0, 14.0],          # stop-ramp exponent (paper: 5, 7, 12)
    "p2": [0.6, 2.5],           # t-grid exponent (paper: 1.2)
    "stop": [1.0, 8.0],         # stopping index, real-valued (paper: 2, 3)
    "solver": ["dpmpp_1s", "dpmpp_2m"],
    "final_denoise": [False, True],
    "freeu": True,              # search t_aug and the FreeU values (UNet models only)
    "b1": [1.0, 1.6], "b2": [1.0, 1.6], "s1": [0.2, 1.0], "s2": [0.1, 1.0],
    "freeu_variant": ["diffusers", "original"],
    "guidance": None,           # fixed per study; a [lo, hi] range opens it
}


@dataclass(frozen=True)
class Candidate:
    """One point of the search space, resolved to what the sampler runs."""

    budget: int
    p1: float
    p2: float
    stop: float
    solver: str
    final_denoise: bool = False
    t_aug: Optional[int] = None            # first step with FreeU on (None: off)
    freeu: Optional[FreeU] = None
    freeu_variant: str = "diffusers"
    guidance: float = 5.5

    @property
    def steps(self) -> int:
        return self.budget - int(self.final_denoise)

    def schedule_spec(self) -> dict:
        return {"name": "paper", "steps": self.steps, "p1": self.p1, "p2": self.p2,
                "stop": self.stop, "final_denoise": self.final_denoise}

    def sigmas(self, table):
        return schedules.build(self.schedule_spec(), table)

    def plan(self) -> Optional[FreeUPlan]:
        if self.freeu is None or self.t_aug is None or self.t_aug >= self.budget:
            return None
        return FreeUPlan.from_start(self.budget, self.t_aug, self.freeu, self.freeu_variant)

    @classmethod
    def from_params(cls, params: dict, budget: int, guidance: float) -> "Candidate":
        """From Optuna trial params (the inverse of ``Space.suggest``)."""
        freeu = (FreeU(*(params[k] for k in FREEU_KEYS))
                 if params.get("freeu") and all(k in params for k in FREEU_KEYS) else None)
        return cls(budget=int(params.get("nfe", budget)), p1=params["p1"], p2=params["p2"],
                   stop=params["stop"], solver=params["solver"],
                   final_denoise=bool(params.get("final_denoise", False)),
                   t_aug=params.get("t_aug"), freeu=freeu,
                   freeu_variant=params.get("freeu_variant", "diffusers"),
                   guidance=float(params.get("guidance", guidance)))


def _range(space: dict, key: str):
    v = space[key]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and v[0] <= v[1]):
        raise ValueError(f"search space {key!r} must be [low, high], got {v!r}")
    return float(v[0]), float(v[1])


@dataclass
class Space:
    """The search space from the study config; ``suggest`` is the only place trials are sampled."""

    ranges: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))

    def __post_init__(self) -> None:
        unknown = set(self.ranges) - set(DEFAULT_SPACE)
        if unknown:
            raise ValueError(f"unknown search-space keys: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(DEFAULT_SPACE)}")
        self.ranges = {**DEFAULT_SPACE, **self.ranges}
        r = self.ranges
        if _range(r, "p1")[0] <= 0 or _range(r, "p2")[0] <= 0:
            raise ValueError("search space: p1 and p2 must stay > 0")
        if _range(r, "stop")[0] < 1:
            raise ValueError("search space: stop must stay >= 1")
        for k in FREEU_KEYS:
            if _range(r, k)[0] <= 0:
                raise ValueError(f"search space: FreeU {k} must stay > 0 (diffusers treats 0 as off)")
        for s in r["solver"]:
            solvers.canonical(s)
        if r["guidance"] is not None:
            _range(r, "guidance")

    def suggest(self, trial, budget: int, guidance: float, freeu_ok: bool,
                nfe_range: Optional[tuple[int, int]] = None) -> Candidate:
        r = self.ranges
        if nfe_range is not None:
            budget = trial.suggest_int("nfe", *nfe_range)
        final_choices = [c for c in r["final_denoise"] if budget > 1 or not c]
        final = bool(trial.suggest_categorical("final_denoise", final_choices))
        p1 = trial.suggest_float("p1", *_range(r, "p1"))
        p2 = trial.suggest_float("p2", *_range(r, "p2"))
        stop = trial.suggest_float("stop", *_range(r, "stop"))
        solver = trial.suggest_categorical("solver", [solvers.canonical(s) for s in r["solver"]])
        t_aug, freeu, variant = None, None, "diffusers"
        # An explicit on/off switch rather than "t_aug = budget means off": FreeU is then off in
        # half the random start-up trials instead of 1/(budget+1), and TPE learns the switch
        # directly — FreeU values tuned for one UNet can ruin another.
        if freeu_ok and r["freeu"] and trial.suggest_categorical("freeu", [False, True]):
            t_aug = trial.suggest_int("t_aug", 0, budget - 1)
            freeu = FreeU(*(trial.suggest_float(k, *_range(r, k)) for k in FREEU_KEYS))
            variant = trial.suggest_categorical("freeu_variant", list(r["freeu_variant"]))
        if r["guidance"] is not None:
            guidance = trial.suggest_float("guidance", *_range(r, "guidance"))
        return Candidate(budget, p1, p2, stop, solver, final, t_aug, freeu, variant, guidance)


def nearest_paper_preset(family: str, budget: int) -> str:
    """The paper's preset for this model family whose NFE is nearest the budget (ties: smaller)."""
    prefix = "sdxl" if family == "sdxl" else "sd15"
    names = [n for n in schedules.PAPER_SETTINGS if n.startswith(prefix)]
    return min(names, key=lambda n: (abs(schedules.PAPER_SETTINGS[n]["steps"] - budget),
                                     schedules.PAPER_SETTINGS[n]["steps"]))


def preset_params(name: str, budget: int, freeu_ok: bool, space: Space) -> dict:
    """The paper preset's hyperparameters transplanted to this budget, as trial params.

    The sdxl-6 per-step FreeU plan has no t_aug form; its nearest one (on from step 1 with the
    first setting) stands in.
    """
    from .presets import paper_preset

    s = schedules.PAPER_SETTINGS[name]
    preset = paper_preset(name)
    params = {"final_denoise": False, "p1": s["p1"], "p2": s["p2"],
              "stop": schedules.equivalent_stop(s["steps"], s["M"], s["k"]),
              "solver": preset.solver}
    if freeu_ok and space.ranges["freeu"]:
        plan = preset.freeu
        on = [i for i, st in enumerate(plan.steps) if st is not None] if plan else []
        params["freeu"] = bool(on) and on[0] < budget
        if params["freeu"]:
            params["t_aug"] = on[0]
            params.update(plan.steps[on[0]].as_dict())
            params["freeu_variant"] = plan.variant
    return _clamp_to_space(params, space)


def seed_trials(family: str, budget: int, freeu_ok: bool, space: Space) -> list[dict]:
    """The trials a study starts from: the paper's preset nearest the budget as published, and its
    schedule alone (DPM++2M, no FreeU) — two informed points before TPE's random start-up."""
    name = nearest_paper_preset(family, budget)
    first = preset_params(name, budget, freeu_ok, space)
    plain = {**{k: v for k, v in first.items() if k not in (*FREEU_KEYS, "t_aug", "freeu_variant")},
             "solver": "dpmpp_2m"}
    if "freeu" in plain:
        plain["freeu"] = False
    seeds = [first] + ([plain] if plain != first else [])
    return [s for s in seeds if s["solver"] in [solvers.canonical(x) for x in space.ranges["solver"]]]


def _clamp_to_space(params: dict, space: Space) -> dict:
    """Enqueued params must lie inside the distributions, or Optuna rejects them."""
    out = dict(params)
    for k, v in params.items():
        if k in ("p1", "p2", "stop", *FREEU_KEYS):
            lo, hi = _range(space.ranges, k)
            out[k] = min(max(float(v), lo), hi)
    if out.get("freeu_variant") not in (None, *space.ranges["freeu_variant"]):
        out["freeu_variant"] = space.ranges["freeu_variant"][0]
    return out


# -- storage, slots and heartbeats -----------------------------------------------------------------
def make_storage(url: str, heartbeat: float = 10.0, grace: float = 30.0):
    """An Optuna RDB storage (sqlite, PostgreSQL, MySQL) with heartbeats, so trials of killed
    workers are detected, failed and re-queued (RetryHeartbeatStaleTrialCallback)."""
    if "://" not in url:
        raise ValueError(f"--storage must be a database URL such as sqlite:///study.db or "
                         f"postgresql://user:pass@host/db, got {url!r}")
    from sqlalchemy.exc import SQLAlchemyError

    from .locks import sqlite_init_lock

    for attempt in range(6):
        try:
            with sqlite_init_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=max(1, int(round(heartbeat))),
                    grace_period=max(2, int(round(grace))),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=3),
                    engine_kwargs={"pool_pre_ping": True})
        except SQLAlchemyError:
            # workers on other machines creating the schema at the same moment collide once
            # ("type already exists"); the next attempt finds the schema in place
            if attempt == 5:
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))


def make_sampler(name: str, seed: int, multi_objective: bool):
    if name == "tpe":
        with warnings.catch_warnings():  # group=True is "experimental" but handles our conditional space
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True, n_startup_trials=8)
    if name == "cmaes":
        if multi_objective:
            raise ValueError("the cmaes sampler is single-objective; use tpe or random")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"--sampler must be tpe, cmaes, gp or random, got {name!r}")


def claim(study: optuna.Study, storage) -> Optional[optuna.Trial]:
    """Take one WAITING slot (lowest number first); None when none is left."""
    sid = storage.get_study_id_from_name(study.study_name)
    for ft in storage.get_all_trials(sid, deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(sid, ft.number)
        try:
            if storage.set_trial_state_values(tid, state=optuna.trial.TrialState.RUNNING):
                storage.record_heartbeat(tid)
                return optuna.Trial(study, tid)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class Heartbeat:
    """Records the trial's heartbeat from a thread while it runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(storage, trial_id, interval),
                                        daemon=True)

    def _run(self, storage, trial_id, interval):
        while not self._stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a transient database error must not kill the trial
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, re-queue) trials whose heartbeat went stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def counts(study: optuna.Study) -> dict:
    out: dict = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished_slots(study: optuna.Study) -> int:
    """Trials that ran to an end, not counting those failed by an interrupted worker (which were
    re-queued and run again)."""
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            done += 1
        elif t.state == optuna.trial.TrialState.FAIL and "fail_reason" in t.user_attrs:
            done += 1
    return done


def config_json(config) -> dict:
    data = asdict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    return json.loads(json.dumps(data, default=str))


def safe_float(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
