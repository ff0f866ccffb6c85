"""Rebuild a study's comparison figures and table from its MLflow store alone.

    python analysis/study_figures.py --out schedsearch-runs/digits-5nfe [--study digits-5nfe] [--to DIR]

Reads the parent run and its nested trial/baseline runs (params, metrics, tags) and writes
fid_vs_trial.png, schedules.png, partial_fid.png and comparison.md into --to (default: the run folder).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def load_runs(uri: str, study: str | None):
    from mlflow.tracking import MlflowClient

    from schedsearch.tracking import ROLE

    client = MlflowClient(tracking_uri=uri)
    # a study is an experiment holding a study run; MLflow's own "Default" holds none (taking the
    # last experiment listed picked it, and drew empty figures)
    exps = [e for e in client.search_experiments(order_by=["last_update_time DESC"])
            if (e.name == study if study else
                client.search_runs([e.experiment_id], f"tags.`{ROLE}` = 'study'", max_results=1))]
    if not exps:
        raise SystemExit(f"no study {'named ' + study + ' ' if study else ''}in {uri}")
    exp = exps[0]
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parent = next((r for r in runs if r.data.tags.get(ROLE) == "study"), None)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == (parent.info.run_id if parent else None)]
    return client, exp, parent, children


def main() -> int:
    from schedsearch import plots
    from schedsearch.tracking import NAME, ROLE, STATE, tracking_uri_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the run folder (holds mlflow.db)")
    ap.add_argument("--study", help="the study's name (default: the latest study in the store)")
    ap.add_argument("--to", help="where to write the figures (default: --out)")
    args = ap.parse_args()
    to = Path(args.to or args.out)
    to.mkdir(parents=True, exist_ok=True)
    client, exp, parent, children = load_runs(tracking_uri_for(args.out), args.study)

    trials, baselines, curves, partial = [], {}, {}, {}
    for r in children:
        role, m, p = r.data.tags.get(ROLE), r.data.metrics, r.data.params
        name = r.data.tags.get(NAME, r.info.run_name)
        if "fid" not in m:
            continue
        if role in ("trial", "best"):
            trials.append((int(name.split()[-1]), m["fid"]))
            hist = client.get_metric_history(r.info.run_id, "fid_partial")
            partial[name] = sorted((h.step, h.value) for h in hist)
        elif role == "baseline":
            baselines[name] = m["fid"]
            curves[name] = json.loads(p["sigmas"])
        if role == "best":
            curves[f"best ({name})"] = json.loads(p["sigmas"])
    best = next((k for k in curves if k.startswith("best")), None)

    plots.fid_vs_trial(trials, baselines, f"{exp.name}: FID proxy by trial").savefig(to / "fid_vs_trial.png", dpi=120)
    plots.schedules(curves, f"{exp.name}: winner vs baselines", highlight=best).savefig(to / "schedules.png", dpi=120)

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in partial.items():
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, alpha=0.6)
    ax.set_xlabel("images scored (nested subsets)")
    ax.set_ylabel("FID proxy")
    ax.set_title("FID at growing subset sizes (what the pruner sees)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(to / "partial_fid.png", dpi=120)

    if parent is not None:
        try:
            table = client.download_artifacts(parent.info.run_id, "comparison.md", str(to))
            print(Path(table).read_text())
        except Exception as exc:  # the study may not have finished yet
            print(f"(no comparison table yet: {exc})")
    states = {}
    for r in children:
        states[r.data.tags.get(STATE, "?")] = states.get(r.data.tags.get(STATE, "?"), 0) + 1
    print(f"{len(trials)} scored trials, {len(baselines)} baselines, run states {states}")
    print(f"figures written to {to}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
