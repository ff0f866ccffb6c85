"""Several workers and killed workers: exact trial counts, no duplicates, nothing left RUNNING.

PostgreSQL: set SCHEDSEARCH_TEST_POSTGRES to a server URL (``.ci/run`` starts one and sets it, with
SCHEDSEARCH_REQUIRE_POSTGRES=1 so a missing server fails instead of skipping).
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from schedsearch import slots

ARGS = ["--model", "gmm", "--budget", "4", "--n-search", "96", "--n-heldout", "32",
        "--batch-size", "32", "--baselines", "karras,ays", "--no-progress", "--no-user-preset",
        "--heartbeat", "1", "--grace", "3", "--refine", "0.5"]   # half the trials in each stage


def worker(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "schedsearch", "run", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def check_exact(storage, name, n):
    """Exactly n slots ran to an end over both stages, each number once, nothing left running,
    and no two trials evaluated the same point."""
    trials, part_global = [], None
    main = optuna.load_study(study_name=name, storage=storage)
    for study, _ in slots.stored_stages(storage, main):
        part = study.get_trials()
        part_global = part if part_global is None else part_global
        numbers = [t.number for t in part]
        assert len(numbers) == len(set(numbers))
        assert not [t for t in part if not t.state.is_finished()], [t.state for t in part]
        trials += part
    done = [t for t in trials if t.state != optuna.trial.TrialState.FAIL or "fail_reason" in t.user_attrs]
    assert len(done) == n, [(t.number, t.state.name) for t in trials]
    points = [json.dumps(t.user_attrs["candidate"]["sigmas"]) + t.user_attrs["candidate"]["solver"]
              for t in done if "candidate" in t.user_attrs]
    assert len(points) == len(set(points)), "two trials evaluated the same point"
    return trials[:len(part_global)], trials[len(part_global):]


def postgres_url():
    url = os.environ.get("SCHEDSEARCH_TEST_POSTGRES")
    if not url:
        if os.environ.get("SCHEDSEARCH_REQUIRE_POSTGRES"):
            pytest.fail("SCHEDSEARCH_REQUIRE_POSTGRES is set but SCHEDSEARCH_TEST_POSTGRES is not")
        pytest.skip("no PostgreSQL server: set SCHEDSEARCH_TEST_POSTGRES (.ci/run does)")
    import psycopg

    db = f"ss_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    return url.rsplit("/", 1)[0] + "/" + db


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_finish_exactly_the_requested_trials(tmp_path, backend):
    storage = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else postgres_url()
    name = f"two-{backend}"
    procs = [worker(tmp_path / "out", "--storage", storage, "--study-name", name, "--trials", "8")
             for _ in range(2)]
    logs = [finish(p) for p in procs]
    global_, local = check_exact(storage, name, 8)
    # the local stage's 4 slots, in the runs the first worker done with the global stage laid
    # out (one of 4, or two of 2: it depends on how far the second solver's best is behind)
    layout = optuna.load_study(study_name=name, storage=storage).user_attrs["local_slots"]
    assert sum(layout) == 4 and layout in ([4], [2, 2])
    assert [t.number for t in global_] == [0, 1, 2, 3]
    assert [t.number for t in local] == [n for size in layout for n in range(size)]
    trials = global_ + local
    # every warm-start slot ran once (the 2 best baselines × 5 solvers, cut to the free slots)
    warm = [t.user_attrs["warm"] for t in trials if "warm" in t.user_attrs]
    assert sorted(warm) == list(range(len(warm))) and warm
    base = optuna.load_study(study_name=f"{name}:baselines", storage=storage)
    assert sorted(tuple(t.user_attrs["baselines"]) for t in base.get_trials()) == [("ays",), ("karras",)]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in base.get_trials())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=200)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # a worker stalled past the grace period (a loaded CI machine) has its slot taken over: its
    # run ends KILLED as interrupted beside the re-queued copy's, which is the one that counts
    taken = [r for r in runs if r.data.tags.get("schedsearch.state") == "INTERRUPTED"]
    assert all(r.info.status == "KILLED" for r in taken)
    kept = [r for r in runs if r not in taken]
    assert len([r for r in kept if r.data.tags["schedsearch.role"] == "baseline"]) == 2
    assert len([r for r in kept if r.data.tags["schedsearch.role"] in ("trial", "best")]) == 8
    assert any("| karras dpm++2m @4 |" in log for log in logs)


def test_killed_study_resumes_with_finished_trials_intact(tmp_path):
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    proc = worker(out, "--trials", "6", "--n-search", "512")
    victim, kept, rdb = None, {}, None
    deadline = time.time() + 300
    while victim is None:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no trial ever ran"
        time.sleep(0.05)
        try:
            # one storage object for the whole loop: opening one per poll (an engine and a schema
            # check) is slow enough on a busy machine to miss the window of the third trial
            trials = optuna.load_study(study_name="gmm-4nfe", storage=rdb or storage).get_trials()
            rdb = rdb or optuna.storages.RDBStorage(storage)   # the study exists: so do its tables
        except Exception:
            continue
        done = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if len(done) >= 2 and running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            victim = running[0].number
            kept = {t.number: (t.state, t.values, t.params) for t in done}
    # the killed trial is still RUNNING in storage and its MLflow run too, until the study resumes
    study = optuna.load_study(study_name="gmm-4nfe", storage=storage)
    assert study.get_trials()[victim].state == optuna.trial.TrialState.RUNNING

    finish(worker(out, "--trials", "6", "--n-search", "512"))
    trials, local = check_exact(storage, "gmm-4nfe", 6)
    by_number = {t.number: t for t in trials}   # the victim was a trial of the global stage
    for number, (state, values, params) in kept.items():   # finished trials kept as they were
        assert by_number[number].state == state and by_number[number].values == values
        assert by_number[number].params == params
    dead = by_number[victim]
    assert dead.state == optuna.trial.TrialState.FAIL and "fail_reason" not in dead.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retry) == 1 and retry[0].state.is_finished()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gmm-4nfe").experiment_id], max_results=200)
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    # the victim's slot: its killed run, and its retry's under the same number
    slot = sorted((r.info.status, r.data.tags["schedsearch.state"]) for r in runs
                  if r.data.tags.get("schedsearch.trial") == str(victim))
    assert slot == [("FINISHED", retry[0].state.name), ("KILLED", "INTERRUPTED")], slot
    parent = [r for r in runs if r.data.tags["schedsearch.role"] == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"


def test_workers_starting_together_share_a_fresh_mlflow_database():
    """On a fresh PostgreSQL MLflow database (the README's setup for several machines), workers
    started together each created MLflow's tables: all but one died on a duplicate type."""
    uri = postgres_url()
    code = ("from schedsearch.tracking import Tracker; "
            f"t = Tracker({uri!r}, 'together', '/tmp/schedsearch-artifacts'); "
            "print('experiment', t.experiment_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
             for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    ids = {out.strip().splitlines()[-1] for out in outs}
    assert len(ids) == 1 and ids.pop().startswith("experiment "), outs
