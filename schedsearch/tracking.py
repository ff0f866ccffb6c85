"""MLflow logging: one experiment per study, a parent run for the study, one nested run per trial
and per baseline, and what each run holds (parameters, scores, schedule plot, sample grid, preset).
Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global "active run", so
several trials, workers and resumed processes never fight over it.

Tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<out>/mlflow.db``; artifacts go to
``<out>/mlartifacts``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from safetensors.torch import save_file

from .images import grid
from .locks import check_sqlite_file, sqlite_init_lock, sqlite_path
from .presets import Preset

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROLE, STATE, REASON = "schedsearch.role", "schedsearch.state", "schedsearch.reason"
STUDY, NAME, TRIAL = "schedsearch.study", "schedsearch.name", "schedsearch.trial"
UID = "schedsearch.study_uid"


def tracking_uri_for(out_dir: str | os.PathLike) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


# where a tracking URI came from, and what to do instead of it, for `run` (the default) and `ui`
FROM_ENV = ("MLFLOW_TRACKING_URI", "unset MLFLOW_TRACKING_URI to log to <out>/mlflow.db")


def check_reachable(uri: str, timeout: float = 10.0, *, source: tuple[str, str] = FROM_ENV
                    ) -> None:
    """A tracking server or database that does not answer is one line before any work, rather
    than a wait through MLflow's retries (minutes: MLFLOW_HTTP_REQUEST_MAX_RETRIES for a server,
    its SQLAlchemy store's own for a database) at the first run it logs. Any HTTP answer counts
    as an answer (an auth proxy, a server without /health). ``source``: the setting that named
    the URI, and the way around it, for the message."""
    from .slots import in_memory

    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if in_memory(uri):
        raise ValueError(f"{source[0]} {uri} names no file: the runs would live in memory and be "
                         f"lost when this run ends; give a file, e.g. sqlite:///runs/mlflow.db, "
                         f"or {source[1]}")
    _check_scheme(uri, scheme, source)
    if scheme in ("", "file"):
        _check_file_store(uri, source)
    if scheme == "sqlite":   # a damaged mlflow.db: one line before the model loads
        check_sqlite_file(sqlite_path(uri))
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri, scheme, timeout, source)
    if scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    from .slots import redact

    probe = without_credentials(uri).rstrip("/") + "/health"   # urllib cannot send user:pw@
    try:
        urllib.request.urlopen(probe, timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise ValueError(f"the MLflow tracking server {redact(uri)} ({source[0]}) does not "
                         f"answer ({why}); start it or check the URL, or {source[1]}") from None


def _check_scheme(uri: str, scheme: str, source: tuple[str, str]) -> None:
    """A scheme MLflow has no store for (``sqlit://``, ``postgresq://``) was its traceback once
    the study had been made and the model loaded. The schemes are MLflow's registry's (plugins
    add theirs); where that private registry moved, MLflow's own error stands."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        known = set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return
    if not known or scheme.split("+")[0] in known:
        return
    from .slots import redact
    from .space import did_you_mean

    raise ValueError(f"{source[0]} {redact(uri)}: MLflow has no tracking store for {scheme}://"
                     f"{did_you_mean({scheme}, known - {''})}; use e.g. sqlite:///runs/mlflow.db, "
                     f"postgresql://host/db or http://host:5000, or {source[1]}")


def _check_file_store(uri: str, source: tuple[str, str]) -> None:
    """MLflow's file store (a path, or file://): recent MLflow refuses it when a client opens it,
    which here was a traceback after the model had loaded."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient   # mlflow: heavy, only for a file store

    try:
        MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        why = str(exc).split(". ")[0]
        raise ValueError(f"{source[0]} {uri}: MLflow does not take this store ({why}); use a "
                         f"database, e.g. sqlite:///runs/mlflow.db, or {source[1]}") from None


def without_credentials(url: str) -> str:
    """An http(s) URL without its user:password@ part (and without query or fragment)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_database(uri: str, scheme: str, timeout: float, source: tuple[str, str]) -> None:
    import sqlalchemy

    from .slots import db_error_reason, redact

    args = {} if scheme.startswith("mssql") else {"connect_timeout": int(timeout)}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
    except ImportError as exc:
        raise ValueError(f"{source[0]} {redact(uri)}: its database driver "
                         f"({getattr(exc, 'name', None) or exc}) is not installed; install it, "
                         f"or name an installed one in the URL (postgresql+psycopg://, "
                         f"mysql+pymysql://)") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise ValueError(f"the MLflow tracking database {redact(uri)} ({source[0]}) cannot be "
                         f"reached ({db_error_reason(exc, uri)}); start it or check the URL, or "
                         f"{source[1]}") from None
    finally:
        engine.dispose()


def _schema_race(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is another process creating the same tables."""
    while exc is not None:
        text = str(exc).lower()
        if type(exc).__name__ in ("IntegrityError", "ProgrammingError") and (
                "already exists" in text or "duplicate" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _clip(value, limit: int = 5000) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: str | os.PathLike):
        from mlflow.tracking import MlflowClient  # heavy: imported when a study starts

        # alembic announces every migration step of a fresh sqlite store at INFO, and MLflow
        # that it creates and updates the tables: two timestamped lines above every new study
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = tracking_uri
        with sqlite_init_lock(tracking_uri):  # first use migrates the schema: one process at a time
            exp = self._open(MlflowClient, experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=Path(artifact_dir).resolve().as_uri())
                except Exception:  # another worker (on another machine) created it first
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                self.experiment_id = exp.experiment_id
        self.experiment = experiment

    def _open(self, client_class, experiment: str, tries: int = 6):
        """The client, and the experiment if it exists. On a fresh database server, workers
        started together each create MLflow's tables (the sqlite lock serialises only a file):
        all but one failed on a duplicate table or type. They now wait for the winner's."""
        for attempt in range(tries):
            try:
                self.client = client_class(tracking_uri=self.uri)
                return self.client.get_experiment_by_name(experiment)
            except Exception as exc:
                if attempt == tries - 1 or not _schema_race(exc):
                    raise
                time.sleep(0.5 * 2 ** attempt)

    # -- runs ---------------------------------------------------------------------------------------
    def study_run(self, study_name: str, params: dict, tags: dict, uid: Optional[str] = None
                  ) -> str:
        """The study's parent run: reused when the study resumes, so all its trials stay
        together. ``uid``: the Optuna study's own id; a run of another study of the same name
        (made before the study.db was moved aside, or in another storage) is not this one's,
        and taking it merged two studies' trials and closed the first one's baseline runs."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{STUDY}` = '{study_name}' and tags.`{ROLE}` = 'study'",
            max_results=1000)
        # a run without a uid tag is from before studies had one: its study has none either
        found = [r for r in found if r.data.tags.get(UID) == uid]
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={STUDY: study_name, ROLE: "study", **_str(tags),
                                           **({UID: uid} if uid else {})})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def child(self, parent_id: str, name: str, role: str, params: dict, tags: dict | None = None
              ) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": parent_id, ROLE: role, NAME: name, STATE: "RUNNING",
                  STUDY: self.experiment, **_str(tags or {})})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_child(self, parent_id: str, role: str, name: str) -> Optional[str]:
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ROLE}` = '{role}' "
            f"and tags.`{NAME}` = '{name}' and attributes.status = 'FINISHED'", max_results=1)
        return found[0].info.run_id if found else None

    def children(self, parent_id: str, status: str | None = None) -> list:
        flt = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], flt, max_results=5000)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param  # mlflow: heavy

        items = [Param(k, _clip(v, 6000)) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric  # mlflow: heavy

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if v is not None and v == v]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_series(self, run_id: str, key: str, values: dict) -> None:
        """A metric over steps, e.g. FID at growing subset sizes, in one call."""
        from mlflow.entities import Metric  # mlflow: heavy

        ts = int(time.time() * 1000)
        items = [Metric(key, float(v), ts, int(step)) for step, v in sorted(values.items())
                 if v is not None and v == v]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def finish(self, run_id: str, preset: Preset, res, state: str = "COMPLETE") -> None:
        """End a scored run with one batch of metrics and tags, then its status: FID, KID, NFE,
        CLIP, seconds per stage and FID by subset size (``fid_partial`` by n)."""
        from mlflow.entities import Metric, RunTag  # mlflow: heavy

        ts = int(time.time() * 1000)
        values = {"fid": res.fid, "kid": res.kid, "nfe": preset.nfe, "clip": res.clip,
                  **{f"seconds_{k}": v for k, v in res.seconds.items()}}
        metrics = [Metric(k, float(v), ts, 0) for k, v in values.items()
                   if v is not None and v == v]
        metrics += [Metric("fid_partial", float(v), ts, int(n)) for n, v in sorted(res.fid_at.items())]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(STATE, state)])
        self.client.set_terminated(run_id, status=_STATUS.get(state, "KILLED"))

    def tag(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag  # mlflow: heavy

        self.client.log_batch(run_id, tags=[RunTag(k, _clip(v, 8000)) for k, v in _str(tags).items()])

    def end(self, run_id: str, state: str, reason: str | None = None,
            name: str | None = None) -> None:
        """state: COMPLETE, PRUNED, FAIL or INTERRUPTED; MLflow status follows, and a run that
        did not complete says so in its name ("trial 12 (pruned)"), which every view shows."""
        tags = {STATE: state}
        if reason:
            tags[REASON] = reason
        if name and state in _SUFFIX:
            tags["mlflow.runName"] = f"{name} ({_SUFFIX[state]})"
        self.tag(run_id, tags)
        self.client.set_terminated(run_id, status=_STATUS.get(state, "KILLED"))

    def describe(self, run_id: Optional[str], text: str) -> None:
        """Markdown shown as the run's description (or, with ``run_id`` None, the experiment's)."""
        if run_id is None:
            self.client.set_experiment_tag(self.experiment_id, NOTE, text)
        else:
            self.tag(run_id, {NOTE: text})

    def rename(self, run_id: str, name: str) -> None:
        self.tag(run_id, {"mlflow.runName": name})

    # -- artifacts ----------------------------------------------------------------------------------
    def log_json(self, run_id: str, obj, path: str) -> None:
        self.client.log_dict(run_id, obj, path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_figure(self, run_id: str, fig, path: str) -> None:
        self.client.log_figure(run_id, fig, path)

    def log_image(self, run_id: str, image, path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / Path(path).name
            image.save(local)
            self.client.log_artifact(run_id, str(local), _artifact_dir(path))

    def log_tensors(self, run_id: str, tensors: dict, path: str, metadata: dict | None = None
                    ) -> None:
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / Path(path).name
            save_file(tensors, str(local), metadata=metadata)
            self.client.log_artifact(run_id, str(local), _artifact_dir(path))

    def has_artifact(self, run_id: str, path: str) -> bool:
        return any(a.path == path for a in self.client.list_artifacts(run_id))

    def log_file(self, run_id: str, local: str | os.PathLike, artifact_dir: str | None = None
                 ) -> None:
        self.client.log_artifact(run_id, str(local), artifact_dir)

    # -- housekeeping -------------------------------------------------------------------------------
    def close_orphans(self, parent_id: str, still_running: Iterable[str], min_age: float = 0.0
                      ) -> int:
        """End RUNNING trial runs whose process is gone (not in ``still_running``): marked KILLED
        with state INTERRUPTED, so no run stays RUNNING forever. A run younger than ``min_age``
        seconds is left alone: its worker may not have linked it to its trial yet."""
        alive = set(still_running)
        closed, now_ms = 0, time.time() * 1000
        for run in self.children(parent_id, status="RUNNING"):
            if run.info.run_id not in alive and now_ms - run.info.start_time >= min_age * 1000:
                self.end(run.info.run_id, "INTERRUPTED", INTERRUPTED, run.data.tags.get(NAME))
                closed += 1
        return closed


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
_SUFFIX = {"PRUNED": "pruned", "FAIL": "failed", "INTERRUPTED": "interrupted"}
NOTE = "mlflow.note.content"   # what the MLflow UI renders as a run's or experiment's description
INTERRUPTED = ("the worker running this trial stopped before it finished (killed or crashed); the "
               "trial was marked failed and re-queued")


def _artifact_dir(path: str) -> Optional[str]:
    parent = str(Path(path).parent)
    return None if parent in ("", ".") else parent


def _str(tags: dict) -> dict:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in tags.items() if v is not None}


# -- what a trial's or a baseline's run holds --------------------------------------------------------
def run_params(preset: Preset) -> dict:
    """The MLflow parameters that say what a run sampled."""
    prov = preset.provenance
    return {"solver": preset.solver, "nfe": preset.nfe, "guidance": preset.guidance,
            "sigmas": json.dumps([round(float(s), 6) for s in preset.sigmas]),
            "freeu": preset.freeu_text(),
            "schedule": json.dumps(preset.schedule) if preset.schedule else None,
            **{k: prov[k] for k in ("distilled", "grid_indices") if k in prov}}


def log_result(tracker: Tracker, run: str, preset: Preset, images, shown: tuple) -> None:
    """A run's artifacts: the schedule plot, a sample grid (a scatter for vector testbeds), the
    preset, and the first images as safetensors with their prompts and seeds (``shown``), so
    anyone can check that the preset reproduces them bit for bit."""
    from . import plots  # matplotlib: only when artifacts are drawn

    tracker.log_figure(run, plots.schedules({preset.name: [float(s) for s in preset.sigmas]},
                                            title=f"{preset.name}: σ schedule"), "schedule.png")
    if images.ndim == 4:
        scale = max(1, 128 // images.shape[-1])
        tracker.log_image(run, grid(images, nrow=8, scale=scale), "samples.png")
    else:
        tracker.log_figure(run, plots.scatter(images.numpy()), "samples.png")
    tracker.log_json(run, preset.to_json(), "preset.json")
    prompts, seeds = shown
    tracker.log_tensors(run, {"images": images.contiguous()}, "samples.safetensors",
                        {"prompts": json.dumps(list(map(str, prompts[:len(images)]))),
                         "seeds": json.dumps(list(seeds[:len(images)]))})
