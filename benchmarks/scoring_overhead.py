"""How much of a score's time is spent outside the model calls and the feature extraction?

On the digits testbed (default), for a few step counts, this scores one schedule several times with
the real Scorer and reads its per-stage clock. In the same run, side by side, it times the bare
work a scorer cannot avoid: the same model calls on the same batches (the sampler's own clock) and
the same feature extraction, with no scoring around them. The overhead is

    share = (total − model − features) / total

i.e. the solver arithmetic, conditioning and initial noise, decoding, statistics (FID at every
checkpoint, KID) and bookkeeping. Target: under 10 %.

    python benchmarks/scoring_overhead.py [--model digits] [--n 256] [--repeats 3] [--threads 1]

One torch thread by default: on a shared two-core machine two threads made each digits UNet call
~12x slower (spinning OpenMP threads), which would hide the overhead behind inflated model time.

Writes benchmarks/results/scoring_overhead-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as stats
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from schedsearch import __version__, prompts, schedules  # noqa: E402
from schedsearch.metrics.features import build as build_extractor  # noqa: E402
from schedsearch.metrics.refstats import default_refstats  # noqa: E402
from schedsearch.metrics.score import Scorer  # noqa: E402
from schedsearch.models import default_guidance, default_prompts  # noqa: E402
from schedsearch.models import load  # noqa: E402
from schedsearch.sampler import sample  # noqa: E402


def bare(model, extractor, sigmas, pset, guidance, batch_size, checkpoints):
    """Model calls and features only, on the same batches as the Scorer, no statistics."""
    t_model = t_feat = 0.0
    t0 = time.perf_counter()
    start = 0
    for stop_at in checkpoints:
        while start < stop_at:
            stop = min(start + batch_size, stop_at)
            out = sample(model, sigmas, pset.prompts[start:stop], pset.seeds[start:stop],
                         guidance=guidance, batch_size=batch_size)
            t_model += out.seconds["model"]
            t1 = time.perf_counter()
            extractor(out.images)
            t_feat += time.perf_counter() - t1
            start = stop
    return {"model": t_model, "features": t_feat, "total": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's)")
    ap.add_argument("--out", default=None,
                    help="JSON file to write (default: benchmarks/results/"
                         "scoring_overhead-<model>.json, the committed results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load(args.model, device="cpu")
    extractor = build_extractor(model=model, device="cpu")
    ref = default_refstats(model, extractor)
    pset = prompts.load(default_prompts(model), args.n, 0)
    guidance = default_guidance(model.family)
    checkpoints = (args.n // 4, args.n // 2)
    # no first-call cache: this measures the scorer around the same model calls the bare loop
    # makes, and a cached first call would make the scorer look faster than the model
    scorer = Scorer(model, extractor, ref, pset, guidance=guidance, batch_size=args.batch_size,
                    checkpoints=checkpoints, share_first_calls=False)
    # warm-up: first calls allocate and pick kernels
    scorer.score(schedules.karras(3))

    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        sigmas = schedules.karras(steps, model.table.sigma_min, model.table.sigma_max)
        runs, bares = [], []
        for _ in range(args.repeats):
            # interleaved, so both see the same machine load
            res = scorer.score(sigmas)
            runs.append(res.seconds)
            bares.append(bare(model, extractor, sigmas, pset, guidance, args.batch_size,
                              scorer.checkpoints))
        share = [(r["total"] - r["model"] - r["features"]) / r["total"] for r in runs]
        row = {
            "steps": steps, "nfe": res.nfe, "fid": res.fid, "kid": res.kid,
            "scorer_seconds_median": {k: stats.median(r[k] for r in runs) for k in runs[0]},
            "bare_seconds_median": {k: stats.median(b[k] for b in bares) for k in bares[0]},
            "overhead_share_median": stats.median(share),
            "overhead_share_max": max(share),
        }
        row["total_vs_bare"] = (row["scorer_seconds_median"]["total"]
                                / row["bare_seconds_median"]["total"])
        rows.append(row)
        print(f"{steps:>3} steps: total {row['scorer_seconds_median']['total']:.3f}s, model "
              f"{row['scorer_seconds_median']['model']:.3f}s, features "
              f"{row['scorer_seconds_median']['features']:.3f}s, statistics "
              f"{row['scorer_seconds_median']['statistics']:.3f}s -> outside model+features "
              f"{100 * row['overhead_share_median']:.1f}% "
              f"(max {100 * row['overhead_share_max']:.1f}%); "
              f"scorer/bare wall {row['total_vs_bare']:.3f}")
    result = {
        "benchmark": "scoring_overhead", "model": model.name, "fingerprint": model.fingerprint(),
        "extractor": extractor.name, "n": args.n, "batch_size": args.batch_size,
        "checkpoints": list(scorer.checkpoints), "guidance": guidance, "repeats": args.repeats,
        "solver": "dpmpp_2m", "schedule": "karras", "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "schedsearch": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows,
    }
    out = args.out or os.path.join(HERE, "results", f"scoring_overhead-{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
