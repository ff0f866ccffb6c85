"""Everything that talks to Optuna's storage: the study's slot queues, claiming a slot, heartbeats,
and failing the slots of workers that died.

Trials are *slots*: the worker that creates a study enqueues exactly the requested number of
WAITING trials, and every worker — in this process or on other machines sharing the storage — only
claims WAITING slots (an atomic WAITING → RUNNING transition in the storage) and never creates
trials. So N workers finish exactly the requested number of trials with no duplicates. A slot whose
worker dies stops sending heartbeats; after the grace period another worker (or the same command,
re-run) marks it FAIL and the storage's callback re-queues its parameters as a fresh slot.

This is the only module that touches Optuna internals: ``optuna.Trial(study, trial_id)`` to hand a
claimed slot to the sampler, and ``trial._trial_id`` for its heartbeat — Optuna's public ``ask()``
always creates a new trial, which would break the exact slot count. Tested with Optuna 5.0.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import optuna
from sqlalchemy.exc import SQLAlchemyError

from .locks import sqlite_init_lock

optuna.logging.set_verbosity(optuna.logging.WARNING)

WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


def make_storage(url: str, heartbeat: float = 10.0, grace: float = 30.0):
    """An Optuna RDB storage (sqlite, PostgreSQL, MySQL) with heartbeats, so trials of killed
    workers are detected, failed and re-queued (RetryHeartbeatStaleTrialCallback)."""
    if "://" not in url:
        raise ValueError(f"--storage must be a database URL such as sqlite:///study.db or "
                         f"postgresql://user:pass@host/db, got {url!r}")
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


def redact(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}"
    return url


@dataclass
class Studies:
    """The study's two slot queues in one storage: trials, and baselines (``<name>:baselines``,
    one slot per baseline group). Both go through the same claim / heartbeat / stale-recovery
    path, so with many workers every baseline is scored once and the trial numbers count trials
    only."""

    trials: optuna.Study
    baselines: optuna.Study
    storage: object

    def all(self):
        return (self.baselines, self.trials)


def create_or_load(storage, name: str, **kwargs) -> tuple[optuna.Study, bool]:
    """The study ``name`` and whether this call created it."""
    try:
        return optuna.create_study(storage=storage, study_name=name, **kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        kwargs.pop("directions", None)
        return optuna.load_study(study_name=name, storage=storage, **kwargs), False


def load(storage, name: str, **kwargs) -> optuna.Study:
    """An existing study, or a ValueError that says it is not there."""
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        raise ValueError(f"no study named {name!r} in this storage") from None


def wait_for(get: Callable, seconds: float):
    """Poll ``get()`` until it returns something other than None, or the time is up."""
    deadline = time.time() + seconds
    while True:
        v = get()
        if v is not None or time.time() > deadline:
            return v
        time.sleep(0.5)


def claim(study: optuna.Study, storage) -> Optional[optuna.Trial]:
    """Take one WAITING slot (lowest number first); None when none is left."""
    sid = storage.get_study_id_from_name(study.study_name)
    for ft in storage.get_all_trials(sid, deepcopy=False, states=(WAITING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(sid, ft.number)
        try:
            if storage.set_trial_state_values(tid, state=RUNNING):
                storage.record_heartbeat(tid)
                return optuna.Trial(study, tid)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


@contextlib.contextmanager
def heartbeat(storage, trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Record the trial's heartbeat from a thread while the body runs."""
    stop = threading.Event()
    trial_id = trial._trial_id

    def beat():
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a transient database error must not kill the trial
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def user_attrs(storage, trial: optuna.Trial) -> dict:
    """A claimed trial's user attributes as stored now."""
    return storage.get_trial(trial._trial_id).user_attrs


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, re-queue) trials whose heartbeat went stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def trials_of(study: optuna.Study, *states) -> list:
    """The study's trials, optionally only those in ``states``."""
    return study.get_trials(deepcopy=False, states=states or None)


def busy(studies: Studies, *states) -> bool:
    """Whether any slot of either queue is in ``states`` (default: waiting or running)."""
    return any(trials_of(st, *(states or (WAITING, RUNNING))) for st in studies.all())


def counts(study: optuna.Study) -> dict:
    out: dict = {}
    for t in trials_of(study):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished_slots(study: optuna.Study) -> int:
    """Trials that ran to an end, not counting those failed by an interrupted worker (which were
    re-queued and run again)."""
    done = 0
    for t in trials_of(study):
        if t.state in (COMPLETE, PRUNED):
            done += 1
        elif t.state == FAIL and "fail_reason" in t.user_attrs:
            done += 1
    return done


# -- opening a study ------------------------------------------------------------------------------
def open_studies(storage, name: str, *, directions: list, sampler, pruner, identity: dict,
                 attrs: dict, trials: int, seeds: list, baseline_groups: list) -> Studies:
    """Create the study (or join it) and make sure its slots exist.

    ``identity``: what the study measures; joining a study stored with another identity is
    refused. ``attrs``: user attributes written by the creator. ``seeds``: (why, params) of the
    first slots. ``baseline_groups``: lists of baseline keys, one slot each.
    """
    study, created = create_or_load(storage, name, directions=directions, sampler=sampler,
                                    pruner=pruner)
    if created:
        study.set_user_attr("identity", identity)
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    else:
        stored = wait_for(lambda: study.user_attrs.get("identity"), 60)
        if stored is not None and stored != identity:
            diff = {k: (stored.get(k), identity.get(k)) for k in identity
                    if stored.get(k) != identity.get(k)}
            raise ValueError(
                f"study {name!r} already exists with a different setup: "
                + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + ". Re-run with the same settings to continue it, or pass --study-name NEW.")
    base, _ = create_or_load(storage, f"{name}:baselines", directions=["minimize"],
                             sampler=optuna.samplers.RandomSampler(seed=0))
    studies = Studies(study, base, storage)
    _ensure_trial_slots(study, created, trials, seeds)
    have = {tuple(t.user_attrs.get("baselines", ())) for t in trials_of(base)}
    for group in baseline_groups:
        if tuple(group) not in have:
            base.enqueue_trial({}, user_attrs={"baselines": list(group)})
    return studies


def _ensure_trial_slots(study: optuna.Study, created: bool, n: int, seeds: list) -> None:
    """The creator enqueues all trial slots, the first ones holding the seed trials; a re-run that
    asks for more trials adds the difference (extend a study from one worker at a time)."""
    if not created:
        slots = wait_for(lambda: study.user_attrs.get("slots"), 60)
        if slots is not None and n > slots:
            for _ in range(n - slots):
                study.enqueue_trial({})
            study.set_user_attr("slots", n)
        elif slots is None:
            if trials_of(study):
                raise ValueError(f"study {study.study_name!r} has trials but no slot count; it was "
                                 f"not created by schedsearch run")
            created = True  # the creator died before enqueuing: take over
    if created:
        seeds = seeds[:n]
        for why, params in seeds:
            study.enqueue_trial(params, user_attrs={"seeded_from": why})
        for _ in range(n - len(seeds)):
            study.enqueue_trial({})
        study.set_user_attr("slots", n)
