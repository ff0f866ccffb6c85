"""Does the FID proxy see sampling error? Karras DPM++2M at several step counts and guidance scales
on the digits testbed, over disjoint seed sets, so the step-to-step differences can be read against
the seed-to-seed spread.

    python analysis/steps_vs_guidance.py [--guidance 1 2 4] [--steps 3 5 8 20] [--sets 4] [--n 256]

Writes analysis/results/steps_vs_guidance.{json,md} (the table in docs/scoring.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    ap.add_argument("--steps", nargs="+", type=int, default=[3, 5, 8, 20])
    ap.add_argument("--sets", type=int, default=4, help="disjoint seed sets (prompt seeds 0..sets-1)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    args = ap.parse_args()

    from schedsearch import models, schedules
    from schedsearch.metrics.score import build_scorer

    model = models.load(args.model)
    t = model.table
    rows = []
    for g in args.guidance:
        fids = {s: [] for s in args.steps}
        for seed in range(args.sets):
            scorer = build_scorer(model, n=args.n, prompt_seed=seed, guidance=g, batch_size=args.n,
                                  checkpoints=(args.n,))
            for s in args.steps:
                with torch.inference_mode():
                    fids[s].append(scorer.score(schedules.karras(s, t.sigma_min, t.sigma_max),
                                                solver="dpmpp_2m").fid)
            print(f"guidance {g}, seed set {seed}: " +
                  ", ".join(f"{s} steps {fids[s][-1]:.2f}" for s in args.steps), flush=True)
        rows.append({"guidance": g, "fid": {str(s): v for s, v in fids.items()}})

    lo, hi = min(args.steps), max(args.steps)
    # the step count after the fewest against the most (with two counts, the fewest: the
    # second was the most, and the column compared it with itself)
    second = sorted(set(args.steps))[1] if len(set(args.steps)) > 2 else lo
    lines = ["| guidance | " + " | ".join(f"{s} steps" for s in args.steps)
             + f" | {second} − {hi} steps, same seeds |",
             "|---|" + "---|" * (len(args.steps) + 1)]
    for r in rows:
        f = r["fid"]
        cells = [f"{statistics.mean(f[str(s)]):.2f} ± {statistics.stdev(f[str(s)]) if len(f[str(s)]) > 1 else 0:.2f}"
                 for s in args.steps]
        diff = ", ".join(f"{a - b:+.2f}" for a, b in zip(f[str(second)], f[str(hi)]))
        lines.append(f"| {r['guidance']:g} | " + " | ".join(cells) + f" | {diff} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps_vs_guidance.json").write_text(json.dumps(
        {"model": model.fingerprint(), "n": args.n, "sets": args.sets, "solver": "dpmpp_2m",
         "schedule": "karras", "rows": rows}, indent=2) + "\n")
    (out / "steps_vs_guidance.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
