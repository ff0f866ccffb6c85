"""The benchmark's winners and baselines scored again on prompt seeds no study and no held-out set
uses — the check that a result is not tuned to the benchmark's own seeds.

    python analysis/unseen_seeds.py [--work analysis/results/runs] [--testbed digits]
                                    [--budgets 4 5 6 8] [--study-seeds 3]
                                    [--prompt-seeds 77 78 79] [--n 200]

For the finished studies ``<work>/<testbed>-<B>nfe-seed<S>``, S = 0 … ``--study-seeds`` − 1 (what
``analysis/benchmark.py --study-seeds`` leaves; the same default, 3, so a work folder that also
holds extra seeds of one budget gives the benchmark's own set unless asked), takes the searched
winner (the trial the study picked, as the benchmark's *found*) and every baseline the study
scored, samples ``--n`` images per prompt seed exactly as ``schedsearch score --prompt-seed P
--n N`` does, and reports per budget the mean FID over the prompt seeds of each winner and
baseline, and found / best same-NFE baseline and found / each longer-step reference (Karras@20
on DDPM testbeds), the winners averaged over the study seeds.
Writes ``<out>/unseen_seeds_<testbed>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "analysis"))


def study_presets(folder: Path) -> tuple[dict, object]:
    """The baselines (key → (nfe, preset)) and the searched winner's preset of a finished study:
    the winner as ``schedsearch export --trial <the study's pick>`` reads it."""
    from schedsearch import report, slots

    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    url, name = f"sqlite:///{folder / 'study.db'}", summary["study"]
    winner = report.preset_from_study(url, name, "found", summary["best_trial"])
    storage = slots.make_storage(url)
    # collect_baselines reads the baseline slots only
    studies = slots.Studies(trials=slots.load(storage, name), local=(),
                            baselines=slots.load(storage, f"{name}:baselines"), storage=storage)
    baselines = {k: (b["nfe"], b["preset"]) for k, b in report.collect_baselines(studies).items()}
    return baselines, winner


def ratios(budget: int, winners: list[float], baselines: dict) -> dict:
    """found (mean over the studies) over the best same-NFE baseline and over the long-step
    references the benchmark reports (Karras@20; flow@28 and @50); ``baselines``: key → (nfe,
    fid). A baseline at another NFE that is no reference (the paper's nearest preset) is left
    out, as in the benchmark."""
    from benchmark_report import REFERENCES

    found = sum(winners) / len(winners)
    same = {k: fid for k, (nfe, fid) in baselines.items() if nfe == budget}
    best = min(same, key=same.get)
    out = {"found": found, "winners": winners, "best_same_nfe": best,
           "found_over_best_same_nfe": found / same[best]}
    for key, (nfe, fid) in baselines.items():
        if key in REFERENCES:
            out[f"found_over_{key}"] = found / fid
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "analysis" / "results" / "runs"))
    ap.add_argument("--testbed", default="digits")
    ap.add_argument("--budgets", nargs="+", type=int, default=[4, 5, 6, 8])
    ap.add_argument("--study-seeds", type=int, default=3,
                    help="studies per budget, search seeds 0 … N−1 (default 3, as the benchmark)")
    ap.add_argument("--prompt-seeds", nargs="+", type=int, default=[77, 78, 79])
    ap.add_argument("--n", type=int, default=200, help="images per prompt seed (default 200)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "analysis" / "results"),
                    help="folder for unseen_seeds_<testbed>.json (default: analysis/results, "
                         "the committed results)")
    args = ap.parse_args(argv)

    import numpy as np
    from benchmark_report import REFERENCES

    from schedsearch import models, prompts
    from schedsearch.metrics.score import Scorer, scoring_setup

    model = models.load(args.testbed)
    extractor, ref = scoring_setup(model)
    sets = [prompts.load(models.default_prompts(model), args.n, p) for p in args.prompt_seeds]
    scorers: dict = {}   # per guidance: a study that searched it has winners at their own

    def fid(preset) -> float:
        """Mean FID over the prompt seeds, at the preset's guidance."""
        g = models.default_guidance(model.family) if preset.guidance is None else preset.guidance
        if g not in scorers:
            scorers[g] = [Scorer(model, extractor, ref, s, guidance=g, batch_size=args.batch_size,
                                 checkpoints=[], kid_subsets=0) for s in sets]
        return float(np.mean([s.score(preset.sigmas, solver=preset.solver,
                                      freeu=preset.freeu).fid for s in scorers[g]]))

    references: dict = {}   # the long-step references are the same at every budget: scored once

    result = {"testbed": args.testbed, "prompt_seeds": args.prompt_seeds, "n": args.n,
              "budgets": {}}
    for budget in args.budgets:
        folders = [Path(args.work) / f"{args.testbed}-{budget}nfe-seed{seed}"
                   for seed in range(args.study_seeds)]
        missing = [f.name for f in folders if not (f / "summary.json").exists()]
        if missing:
            raise SystemExit(f"no finished {', '.join(missing)} in {args.work}: run "
                             f"analysis/benchmark.py first (with --study-seeds "
                             f"{args.study_seeds})")
        winners, baselines = [], {}
        for folder in folders:
            bl, winner = study_presets(folder)
            winners.append(fid(winner))
            # the same in every study (no search seed); only those the ratios use are scored
            for key, (nfe, preset) in bl.items():
                if key in REFERENCES:
                    if key not in references:
                        references[key] = fid(preset)
                    baselines[key] = (nfe, references[key])
                elif nfe == budget and key not in baselines:
                    baselines[key] = (nfe, fid(preset))
        entry = ratios(budget, winners, baselines)
        entry["studies"] = [f.name for f in folders]
        entry["baselines"] = {k: {"nfe": nfe, "fid": v} for k, (nfe, v) in baselines.items()}
        result["budgets"][str(budget)] = entry
        refs = {k[len("found_over_"):]: v for k, v in entry.items()
                if k.startswith("found_over_") and k != "found_over_best_same_nfe"}
        print(f"| {budget} | {', '.join(f'{w:.2f}' for w in winners)} | {entry['best_same_nfe']} "
              f"{baselines[entry['best_same_nfe']][1]:.2f} | {entry['found_over_best_same_nfe']:.3f} | "
              + ", ".join(f"{k} {v:.3f}" for k, v in refs.items()) + " |", flush=True)
    path = Path(args.out) / f"unseen_seeds_{args.testbed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
