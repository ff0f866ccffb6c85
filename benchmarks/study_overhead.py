"""Where a default study's time goes: model calls and feature extraction, against everything else.

    python benchmarks/study_overhead.py [--out DIR] [--budget 5] [--trials N] [--threads 2]

Runs the default digits study (what `schedsearch run --budget 5` runs) in a fresh folder, then reads
from its storage, for every trial of both stages (pruned ones included), the seconds spent inside
model calls and feature extraction and the trial's wall time, and splits the whole run's wall time
into phases: setup (imports, model, stores), baselines, trials, and the report (held-out check,
confidence intervals, artifacts). Writes benchmarks/results/study_overhead.json.

Run it on an otherwise idle machine: with another process holding a core, PyTorch's OpenMP threads
spin while they wait and a model call becomes many times slower, which says nothing about
schedsearch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trial_costs(storage: str, name: str) -> list[dict]:
    """Model, features and wall seconds of every finished trial of both stages."""
    import optuna

    from schedsearch import slots

    out = []
    main = optuna.load_study(study_name=name, storage=storage)
    for st, offset in slots.stored_stages(storage, main):
        for t in st.get_trials():
            if not (t.datetime_start and t.datetime_complete):
                continue
            sec = t.user_attrs.get("result", {}).get("seconds") or t.user_attrs.get("seconds", {})
            out.append({"stage": 1 if st is main else 2, "number": t.number + offset,
                        "state": t.state.name,
                        "wall": (t.datetime_complete - t.datetime_start).total_seconds(),
                        "model": sec.get("model", 0.0), "features": sec.get("features", 0.0)})
    return out


def phases(storage: str, name: str, t0: float, t1: float) -> dict:
    """Wall seconds of setup, baselines, trials and report, from the storage's timestamps."""
    import optuna

    def span(study_name):
        trials = [t for t in optuna.load_study(study_name=study_name, storage=storage).get_trials()
                  if t.datetime_start and t.datetime_complete]
        return (min(t.datetime_start for t in trials).timestamp(),
                max(t.datetime_complete for t in trials).timestamp())

    from schedsearch import slots

    b0, b1 = span(name + ":baselines")
    g0, _ = span(name)
    main = optuna.load_study(study_name=name, storage=storage)
    r1 = max(span(st.study_name)[1] for st, _ in slots.stored_stages(storage, main))
    return {"setup": b0 - t0, "baselines": b1 - b0, "trials": r1 - g0, "report": t1 - r1,
            "total": t1 - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="run folder (default: a fresh temporary one)")
    p.add_argument("--budget", type=int, default=5)
    p.add_argument("--trials", type=int, default=None, help="default: the study default")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "study_overhead.json"),
                   help="JSON file to write (default: benchmarks/results/study_overhead.json, "
                        "the committed results)")
    args = p.parse_args()
    os.environ.setdefault("SCHEDSEARCH_PRESETS", tempfile.mkdtemp())
    t0 = time.time()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from schedsearch.config import StudyConfig
    from schedsearch.study import RunOptions, run_study

    out = Path(args.out or tempfile.mkdtemp(prefix="study-overhead-"))
    config = StudyConfig(budget=args.budget, **({"trials": args.trials} if args.trials else {}))
    summary = run_study(config, RunOptions(out=out, progress=False, export_user_preset=False),
                        echo=lambda *_: None)
    t1 = time.time()
    storage, name = f"sqlite:///{out / 'study.db'}", summary["study"]
    costs = trial_costs(storage, name)
    inside = sum(c["model"] + c["features"] for c in costs)
    wall = sum(c["wall"] for c in costs)
    result = {"budget": args.budget, "trials": len(costs), "torch_threads": torch.get_num_threads(),
              "trial_wall_s": wall, "trial_model_s": sum(c["model"] for c in costs),
              "trial_features_s": sum(c["features"] for c in costs),
              "share_in_model_and_features": inside / wall, "phases_s": phases(storage, name, t0, t1),
              "per_trial": costs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ph = result["phases_s"]
    print(f"{len(costs)} trials: {wall:.1f} s of trial time, {inside:.1f} s in model calls + "
          f"feature extraction ({100 * inside / wall:.1f}%)")
    print("whole run: " + ", ".join(f"{k} {v:.1f} s" for k, v in ph.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
