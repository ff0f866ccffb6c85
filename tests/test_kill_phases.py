"""SIGKILL at each phase of a study — creating it, scoring the baselines, the global and the
local stage, the held-out check, the final report — then the same command again: every finished
trial intact, exactly the requested slots, each baseline scored once, nothing left RUNNING in
Optuna or MLflow, and the report written. The kills are real (tests/killer.py kills its own
process at the n-th call of a chosen function), so each phase is hit every time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from test_workers import check_exact

HERE = Path(__file__).parent
ARGS = ["run", "--model", "gmm", "--budget", "4", "--n-search", "64", "--n-heldout", "32",
        "--batch-size", "32", "--baselines", "karras,ays", "--trials", "6", "--no-progress",
        "--no-user-preset", "--heartbeat", "1", "--grace", "2"]
PHASES = {
    "creation": ("optuna.study:Study.enqueue_trial", 3),
    "baselines": ("schedsearch.study:evaluate_baselines", 2),
    "global stage": ("schedsearch.study:evaluate_trial", 2),
    "local stage": ("schedsearch.study:evaluate_trial", 5),
    "held-out check": ("schedsearch.metrics.paired:compare_sets", 1),
    "final report": ("schedsearch.report:log_artifacts", 1),
}


def run(out, *prefix):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *prefix, *ARGS, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)


def finished(storage):
    out = {}
    for suffix in ("", ":refine", ":refine:2", ":baselines"):
        try:
            study = optuna.load_study(study_name="gmm-4nfe" + suffix, storage=storage)
        except KeyError:
            continue
        out.update({(suffix, t.number): (t.state, t.values, t.params)
                    for t in study.get_trials() if t.state.is_finished()})
    return out


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_study_killed_in_any_phase_resumes_intact(tmp_path, phase):
    target, n = PHASES[phase]
    out = tmp_path / "run"
    killed = run(out, str(HERE / "killer.py"), target, str(n))
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    storage = f"sqlite:///{out / 'study.db'}"
    before = finished(storage) if (out / "study.db").exists() else {}

    again = run(out, "-m", "schedsearch")
    assert again.returncode == 0, again.stderr[-3000:]
    check_exact(storage, "gmm-4nfe", 6)
    after = finished(storage)
    for key, (state, values, params) in before.items():   # finished before: kept as they were
        assert after[key] == (state, values, params), key
    base = optuna.load_study(study_name="gmm-4nfe:baselines", storage=storage).get_trials()
    scored = [tuple(t.user_attrs["baselines"]) for t in base
              if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(scored) == [("ays",), ("karras",)]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["key"] for r in summary["rows"]} == {"best", "karras", "ays"}
    assert all("vs_best" in r for r in summary["rows"][1:])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gmm-4nfe").experiment_id],
                              max_results=500)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    study_run = [r for r in runs if r.data.tags["schedsearch.role"] == "study"]
    assert len(study_run) == 1 and study_run[0].info.status == "FINISHED"
    # a killed trial's retry is shown under its slot's number: it took the number of the next
    # stage's first trial (two FINISHED 'trial 3's, and the second could not be exported)
    shown = [int(r.data.tags["schedsearch.trial"]) for r in runs
             if r.data.tags["schedsearch.role"] == "trial" and r.info.status == "FINISHED"]
    assert len(shown) == len(set(shown)) and set(shown) <= set(range(6)), sorted(shown)
    if phase == "global stage":   # trial 1 was killed: its retry is trial 1, and exports
        from schedsearch.cli import main

        assert main(["export", "--out", str(out), "--name", "t1", "--trial", "1", "--to",
                     str(tmp_path / "t1.json")]) == 0


def test_a_kill_inside_a_two_baseline_slot_logs_each_baseline_once(tmp_path):
    """GITS and OSS share a slot. Killed after GITS had logged its run, the slot runs again whole:
    GITS's first run was a second FINISHED 'gits @4' beside the re-run's."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    args = [*ARGS[:ARGS.index("--baselines")], "--baselines", "gits,oss", "--trials", "2",
            "--no-progress", "--no-user-preset", "--heartbeat", "1", "--grace", "2", "--out",
            str(out)]
    killed = subprocess.run([sys.executable, str(HERE / "killer.py"),
                             "schedsearch.tracking:Tracker.finish", "2", *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "schedsearch", *args], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gmm-4nfe").experiment_id],
                              "tags.`schedsearch.role` = 'baseline'", max_results=500)
    status = sorted((r.data.tags["schedsearch.name"], r.info.status) for r in runs)
    assert status == [("gits @4", "FINISHED"), ("gits @4", "KILLED"), ("oss @4", "FINISHED"),
                      ("oss @4", "KILLED")], status
    superseded = next(r for r in runs if r.info.status == "KILLED"
                      and r.data.tags["schedsearch.name"] == "gits @4")
    assert "ran again" in superseded.data.tags["schedsearch.reason"]
