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
import re
import threading
import time
import uuid
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


def in_memory(url: str) -> bool:
    """A sqlite URL that names no file (sqlite://, sqlite:///, sqlite:///:memory:): a database
    that lives in one process and is gone when it ends."""
    scheme, _, rest = url.partition("://")
    return scheme.lower().startswith("sqlite") and rest.split("?")[0].lstrip("/") in ("",
                                                                                    ":memory:")


def make_storage(url: str, heartbeat: float = 10.0, grace: float = 30.0):
    """An Optuna RDB storage (sqlite, PostgreSQL, MySQL) with heartbeats, so trials of killed
    workers are detected, failed and re-queued (RetryHeartbeatStaleTrialCallback). An unreachable
    server, a missing driver or an unknown URL is a ValueError naming the URL, password hidden."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, OperationalError

    if "://" not in url:
        raise ValueError(f"--storage must be a database URL such as sqlite:///study.db or "
                         f"postgresql://user:pass@host/db, got {url!r}")
    shown, scheme = redact(url), url.split("://", 1)[0].lower()
    if in_memory(url):
        raise ValueError(f"--storage {url} names no file: the study would live in memory and be "
                         f"lost when this run ends (no resume, no second worker); give a file, "
                         f"e.g. sqlite:///runs/study.db")

    def connects() -> bool:  # does even a plain connection fail?
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect():
                return True
        except SQLAlchemyError:
            return False
        finally:
            engine.dispose()

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
        except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError
            fix = ("pip install pymysql and use mysql+pymysql://..." if scheme.startswith("mysql")
                   else 'pip install "psycopg[binary]" and use postgresql+psycopg://...'
                   if scheme.startswith("postgres") else "install the driver SQLAlchemy names")
            driver = getattr(exc.__cause__, "name", None) or "module"
            raise ValueError(f"--storage {shown}: its database driver {driver} is not "
                             f"installed; {fix}") from None
        except ArgumentError as exc:
            raise ValueError(f"--storage {shown}: not a database URL SQLAlchemy can use "
                             f"({str(exc).splitlines()[0]})") from None
        except SQLAlchemyError as exc:
            # workers on other machines creating the schema at the same moment collide once
            # ("type already exists"); the next attempt finds the schema in place. A server that
            # refuses a plain connection too will not get better by retrying.
            if attempt < 5 and not (isinstance(exc, OperationalError) and not connects()):
                time.sleep(0.5 + random.random() * (attempt + 1))
                continue
            if not isinstance(exc, OperationalError):
                raise
            reason = db_error_reason(exc, url)
            fix = ("check that its folder exists and is writable" if scheme.startswith("sqlite")
                   else "start the database server, or check the host, port, database, user and "
                        "password in the URL")
            raise ValueError(f"cannot open the study storage {shown} ({reason}); {fix}") from None


def db_error_reason(exc: Exception, url: str) -> str:
    """The first line of a SQLAlchemy error's driver message, with the URL's password hidden."""
    import sqlalchemy

    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    password = sqlalchemy.engine.make_url(url).password
    if not password:
        return reason
    # as a whole token only: a short password ("p") must not eat letters of other words ("port")
    return re.sub(rf"(?<![\w]){re.escape(str(password))}(?![\w])", "***", reason)


def redact(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user, has_password, _ = cred.partition(":")
        return f"{scheme}://{user}{':***' if has_password else ''}@{host}"
    return url


@dataclass
class Studies:
    """The study's slot queues in one storage: the global stage (``<name>``), the local stage's
    CMA-ES runs (``<name>:refine``, ``<name>:refine:2``, …, each around its own start, each its own
    study because CMA-ES keeps its state per study; empty until the global stage is done, which
    decides how many there are) and the baselines (``<name>:baselines``, one slot per baseline
    group). All go through the same claim / heartbeat / stale-recovery path, so with many workers
    every slot runs once."""

    trials: optuna.Study
    local: tuple
    baselines: optuna.Study
    storage: object
    offsets: tuple = ()     # shown number of each local run's first trial

    def all(self):
        return (self.baselines, self.trials, *self.local)

    def numbered(self) -> list[tuple[optuna.Study, int]]:
        """Each stage's studies with what turns their trial numbers into shown ones: trials of
        the local stage are shown numbered after the global stage's, run after run."""
        return [(self.trials, 0), *zip(self.local, self.offsets)]


def local_name(name: str, run: int) -> str:
    return f"{name}:refine" if run == 0 else f"{name}:refine:{run + 1}"


def local_offsets(study: optuna.Study) -> list[int]:
    """The shown number of each local run's first trial, from the stored layout (a study made
    before local runs were split has one run, right after the global stage)."""
    first = int(study.user_attrs.get("slots") or 0)
    sizes = study.user_attrs.get("local_slots") or [0]
    return [first + sum(sizes[:k]) for k in range(len(sizes))]


def open_local(studies: Studies, sizes: list[int], grace: float = 30.0) -> None:
    """Lay out the local stage's runs — ``sizes``, the slots of each — unless a layout is stored
    already (another worker's, or this study's before a restart: the first one stands), create
    their studies and enqueue their slots. Resumable at any point, like ``ensure_slots``."""
    main = studies.trials
    while main.user_attrs.get("local_slots") is None:
        if _take_lease(main, grace):
            try:
                if main.user_attrs.get("local_slots") is None:
                    main.set_user_attr("local_slots", [int(n) for n in sizes])
            finally:
                main.set_user_attr("enqueuing", None)
        else:
            time.sleep(0.5)
    _load_local(studies, grace)


def _load_local(studies: Studies, grace: float) -> None:
    name, stored = studies.trials.study_name, studies.trials.user_attrs.get("local_slots")
    # the local stage's one study from before its runs were laid out after the global stage
    legacy = stored is None and _exists(studies.storage, local_name(name, 0))
    if stored is None and not legacy:
        return
    sizes = stored if stored is not None else [None]
    # no pruning in the local stage: CMA-ES learns only from complete trials, and a pruned
    # sample would be a wasted point of its generation
    local = tuple(create_or_load(studies.storage, local_name(name, run), directions=["minimize"],
                                 sampler=optuna.samplers.RandomSampler(seed=0),
                                 pruner=optuna.pruners.NopPruner())[0]
                  for run in range(len(sizes)))
    for run, n in zip(local, sizes):
        if n is not None:
            ensure_slots(run, [({}, {})] * n, grace)
    studies.local, studies.offsets = local, tuple(local_offsets(studies.trials))


def _exists(storage, name: str) -> bool:
    try:
        load(storage, name)
        return True
    except ValueError:
        return False


def stored_stages(storage, study: optuna.Study) -> list[tuple[optuna.Study, int]]:
    """Every stage's study of a stored study with its shown-number offset (the global stage's
    alone for a study made before there was a local stage)."""
    out = [(study, 0)]
    for run, offset in enumerate(local_offsets(study)):
        try:
            out.append((load(storage, local_name(study.study_name, run)), offset))
        except ValueError:
            break
    return out


@dataclass(frozen=True)
class Slot:
    """A claimed slot: its study, trial id and number, and what the study stored with it;
    ``shown`` is the slot's own number (``slot_number``), ``number`` the trial's in Optuna."""

    study: str
    trial_id: int
    number: int
    user_attrs: dict
    shown: int


def slot_number(trial) -> int:
    """The number of the slot a trial fills, in its study. A retry (re-queued after its worker
    was killed, stalled or interrupted) is a new Optuna trial numbered after every slot — the
    number the next stage's first trial is shown under — so it takes its first attempt's
    number, which Optuna's retry callback keeps in ``failed_trial``."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


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


def claim(study: optuna.Study, storage, accept: Optional[Callable[[dict], bool]] = None
          ) -> Optional[Slot]:
    """Take one WAITING slot (lowest number first) whose user attributes ``accept`` takes;
    None when there is none."""
    sid = storage.get_study_id_from_name(study.study_name)
    for ft in storage.get_all_trials(sid, deepcopy=False, states=(WAITING,)):
        if accept is not None and not accept(ft.user_attrs):
            continue
        tid = storage.get_trial_id_from_study_id_trial_number(sid, ft.number)
        try:
            if storage.set_trial_state_values(tid, state=RUNNING):
                storage.record_heartbeat(tid)
                return Slot(study.study_name, tid, ft.number, dict(ft.user_attrs),
                            slot_number(ft))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def open_trial(study: optuna.Study, storage, slot: Slot, *, sampler,
               fixed: Optional[dict] = None) -> optuna.Trial:
    """The claimed slot as an ``optuna.Trial`` of ``study`` whose suggestions come from
    ``sampler`` (seeded per slot by the caller, so workers never draw the same points) and, for
    the parameters in ``fixed``, are those values (how a warm-start slot gets its point once the
    baselines are known)."""
    if fixed:
        storage.set_trial_system_attr(slot.trial_id, "fixed_params", fixed)
    study.sampler = sampler
    study.get_trials(deepcopy=False)   # the study's cached storage learns the claimed trial
    return optuna.Trial(study, slot.trial_id)


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: float) -> Iterator[None]:
    """Record the trial's heartbeat from a thread while the body runs."""
    stop = threading.Event()

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


def requeue(study: optuna.Study, number: int) -> None:
    """Put an interrupted slot back in the queue with what it had drawn (the same record the
    storage's stale-heartbeat callback makes for a worker that died), so the exact slot count
    holds when a worker stops on an error that is not the candidate's fault (Ctrl-C, a full
    disk)."""
    frozen = next(t for t in trials_of(study) if t.number == number)
    optuna.storages.RetryFailedTrialCallback(max_retry=3)(study, frozen)


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, re-queue) trials whose heartbeat went stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def trials_of(study: optuna.Study, *states) -> list:
    """The study's trials, optionally only those in ``states``."""
    return study.get_trials(deepcopy=False, states=states or None)


def busy(*studies: optuna.Study, states=(WAITING, RUNNING)) -> bool:
    """Whether any slot of these studies is in ``states`` (default: waiting or running)."""
    return any(trials_of(st, *states) for st in studies)


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
                 attrs: dict, plan: list, baseline_groups: list, grace: float = 30.0,
                 trials: Optional[int] = None, defaults: Optional[dict] = None) -> Studies:
    """Create the study (or join it) and make sure its slots exist.

    ``identity``: what the study measures; joining a study stored with another identity is
    refused. ``defaults``: what an identity key left unset (None) stands for on this model, so
    that naming the default (``--guidance 3`` on gmm) joins a study made without it.
    ``attrs``: user attributes written by the creator. ``plan``: the global stage's
    slots in order, each the user attributes and fixed parameters ``(attrs, params)`` it is
    enqueued with. ``baseline_groups``: lists of baseline keys, one slot each. The local stage's
    runs are laid out once the global stage is done (``open_local``); a study that has them
    already gets them here, its last run grown to make ``trials`` in all (``grow_local``).
    """
    study, created = create_or_load(storage, name, directions=directions, sampler=sampler,
                                    pruner=pruner)
    if created:   # identity last: a joining worker waits for it, and then finds the rest
        # uid: tells this study's MLflow run from an earlier study's of the same name in the
        # same run folder (a damaged study.db moved aside, another --storage)
        for k, v in {**attrs, "uid": uuid.uuid4().hex, "identity": identity}.items():
            study.set_user_attr(k, v)
    else:
        _check_identity(study, identity, defaults or {})
    base, _ = create_or_load(storage, f"{name}:baselines", directions=["minimize"],
                             sampler=optuna.samplers.RandomSampler(seed=0))
    ensure_slots(study, plan, grace)
    ensure_slots(base, [({"baselines": list(g)}, {}) for g in baseline_groups], grace,
                 key=lambda attrs: tuple(attrs.get("baselines", ())))
    studies = Studies(study, (), base, storage)
    if trials is not None:
        grow_local(study, trials, grace)
    stored = study.user_attrs.get("config") or {}
    if not created and trials is not None and stored.get("trials", trials) < trials:
        study.set_user_attr("config", {**stored, "trials": trials})   # for the next resume's check
    _load_local(studies, grace)
    return studies


def peek(storage, name: str) -> Optional[dict]:
    """The user attributes of a stored study (None: there is no such study yet)."""
    try:
        return dict(load(storage, name).user_attrs)
    except ValueError:
        return None


def planned_trials(attrs: dict) -> Optional[int]:
    """How many trials a stored study plans: its global slots and laid-out local runs, else
    its config's count (None for neither)."""
    if attrs.get("local_slots") is not None:
        return int(attrs.get("slots") or 0) + sum(attrs["local_slots"])
    return (attrs.get("config") or {}).get("trials")


def stages_of(studies: Studies, local: int) -> tuple[int, int]:
    """(global, local) trials of an opened study: as laid out, or ``local`` (the config's) where
    the local runs are not laid out yet."""
    attrs = studies.trials.user_attrs
    sizes = attrs.get("local_slots")
    return int(attrs.get("slots") or 0), (sum(sizes) if sizes is not None else local)


def grow_local(study: optuna.Study, trials: int, grace: float) -> None:
    """Give a study whose local runs are laid out ``trials`` in all, the extra slots to its
    last run (CMA-ES goes on where it stopped; numbers already shown stay). One write of the
    layout, computed from the layout itself: idempotent, safe under a crash and with several
    workers asking at once."""
    while True:
        sizes = study.user_attrs.get("local_slots")
        if sizes is None or not sizes or planned_trials(study.user_attrs) >= trials:
            return
        if _take_lease(study, grace):
            try:
                sizes = list(study.user_attrs["local_slots"])
                extra = trials - planned_trials(study.user_attrs)
                if extra > 0:
                    study.set_user_attr("local_slots", sizes[:-1] + [sizes[-1] + extra])
            finally:
                study.set_user_attr("enqueuing", None)
        else:
            time.sleep(0.5)


def _check_identity(study: optuna.Study, identity: dict, defaults: dict) -> None:
    """Refuse to join a study stored with another identity; a key left unset (None) counts as
    its value in ``defaults``, so naming the default and leaving it out are the same study."""
    stored = wait_for(lambda: study.user_attrs.get("identity"), 60)
    if stored is None:
        return

    def value(ident: dict, k: str):
        return defaults.get(k) if ident.get(k) is None else ident.get(k)

    def shown(v, k: str) -> str:
        return f"the default ({defaults[k]!r})" if v is None and defaults.get(k) is not None \
            else repr(v)

    diff = [k for k in identity if value(stored, k) != value(identity, k)]
    if diff:
        raise ValueError(
            f"study {study.study_name!r} already exists with a different setup: "
            + "; ".join(f"{k}: stored {shown(stored.get(k), k)}, now {shown(identity.get(k), k)}"
                        for k in diff)
            + ". Re-run with the same settings to continue it, or pass --study-name NEW.")


def _slot_keys(study: optuna.Study, key: Callable) -> set:
    """The keys of the slots a study holds: its ``slot`` attribute, or for slots enqueued before
    slots carried one (schedsearch 0.1.0: in order) their trial number; re-queued retries of a
    killed trial share its key."""
    out = set()
    for t in trials_of(study):
        if "failed_trial" in t.system_attrs and "slot" not in t.user_attrs:
            continue
        out.add(key(t.user_attrs) if key is not None else t.user_attrs.get("slot", t.number))
    return out


def ensure_slots(study: optuna.Study, plan: list, grace: float, key: Optional[Callable] = None
                 ) -> None:
    """Enqueue each slot of ``plan`` — ``(user_attrs, fixed_params)`` in order — that the study
    does not hold yet, once. Slot k is identified by ``key(user_attrs)`` or else by its index,
    stored as the ``slot`` attribute. Resumable at any point: a worker killed half-way leaves
    the rest to the next one, which takes over once the first worker's lease on enqueueing is
    older than ``grace`` seconds; two workers never enqueue at once."""
    def missing():
        have = _slot_keys(study, key)
        return [(k, a, p) for k, (a, p) in enumerate(plan)
                if (key(a) if key is not None else k) not in have]

    while missing():
        if not _take_lease(study, grace):
            time.sleep(0.5)
            continue
        try:
            for k, attrs, params in missing():
                study.enqueue_trial(params, user_attrs={**attrs, "slot": k} if key is None
                                    else dict(attrs))
        finally:
            study.set_user_attr("enqueuing", None)
    if key is None:
        study.set_user_attr("slots", max(len(plan), study.user_attrs.get("slots") or 0))


def _take_lease(study: optuna.Study, grace: float) -> bool:
    """Claim the right to enqueue: a user attribute naming this worker, unless another worker's
    lease is fresher than ``grace``. After writing, wait a moment and read it back: of two
    workers writing at once, the one whose write stands wins."""
    held = study.user_attrs.get("enqueuing")
    if held and time.time() - held["at"] < grace:
        return False
    me = {"by": uuid.uuid4().hex, "at": time.time()}
    study.set_user_attr("enqueuing", me)
    time.sleep(0.2 + 0.3 * random.random())
    return (study.user_attrs.get("enqueuing") or {}).get("by") == me["by"]
