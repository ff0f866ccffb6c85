"""Search quality and search cost against every baseline, over several search seeds.

For each testbed and NFE budget: ``--study-seeds`` studies (``schedsearch run``'s own code, seeds
0, 1, …: the search's seed; prompts and image seeds stay the same), each with every baseline on
the same prompts and seeds and a paired re-scoring of the winner and every baseline on
``--heldout-sets`` disjoint held-out sets; the FID-vs-NFE curve of Karras DPM++2M (on the flow
testbeds: the model's default schedule with Euler); the winners' σ lists; and what the search costs
(wall time, image·model calls, share of trial time spent in model calls and feature extraction).

    python analysis/benchmark.py                 # everything in README's results section
    python analysis/benchmark.py --quick         # a smoke run (8 trials, 64 images), README untouched
    python analysis/benchmark.py --testbeds digits-flow gmm-flow --budgets 4 5 8   # flow matching
    python analysis/benchmark.py --model PATH --prompts captions.json --ref-stats ref.safetensors \
        --testbeds sd --budgets 5                # a real Stable Diffusion checkpoint

Resumable: every study runs in its own folder under ``--work`` (default analysis/results/runs/,
git-ignored), so a killed benchmark started again with the same command continues where it
stopped, and finished studies are read back without loading a model (``--rescore`` picks their
winners again with the current code, trials untouched). A folder that holds a study
with other settings is refused; delete it (or pass another ``--work``) after changing the search.

Writes ``--out`` (default analysis/results/): benchmark.{json,md}, fid_vs_nfe_<testbed>.png,
winners_sigmas_<testbed>.png, and rewrites the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_report  # noqa: E402  (the sibling helper: aggregation, tables, figures)

ROOT = Path(__file__).resolve().parents[1]
CURVE_NFE = (4, 5, 6, 8, 10, 12, 15, 20, 30, 50)
# the mixture's model calls are nearly free, so it affords subsets large enough for FID to settle;
# the flow twins cost what their DDPM twins do
N_DEFAULT = {"digits": 200, "gmm": 1000, "sd": 500, "digits-flow": 200, "gmm-flow": 1000}
QUICK = {"trials": 8, "n_search": 64, "n_heldout": 64, "batch_size": 64, "teacher_steps": 20,
         "distill_samples": 8}
RECORD = "benchmark-run.json"


class TimedModel:
    """Counts model calls (rows) and the time inside them, for the cost of teacher/OSS/GITS."""

    def __init__(self, model):
        self._m, self.seconds, self.rows, self.calls = model, 0.0, 0, 0

    def __getattr__(self, name):
        return getattr(self._m, name)

    def denoise(self, x, sigma, cond, guidance):
        import torch

        t0 = time.perf_counter()
        out = self._m.denoise(x, sigma, cond, guidance)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.rows += x.shape[0]
        self.calls += 1
        return out


def is_flow(testbed: str) -> bool:
    """Whether a testbed is a flow-matching one (``sd``: a Stable Diffusion 1.x/2.x/XL checkpoint
    is not): it decides the baselines and the reference curve."""
    from schedsearch import models

    return models.is_flow(testbed)


def baselines(testbed: str) -> list[str]:
    """Every baseline that applies to the testbed's kind of model (a study refuses the others)."""
    from schedsearch.config import FLOW_BASELINES, SD_BASELINES

    return list(FLOW_BASELINES if is_flow(testbed) else SD_BASELINES)


def sizes(testbed: str, args) -> tuple[int, int]:
    n = args.n_search or N_DEFAULT[testbed]
    return n, args.n_heldout or n


def base_config(testbed: str, args) -> dict:
    """What every study and the reference curve of a testbed share (the search's own settings —
    trials, refine, warm start — stay at StudyConfig's defaults unless given)."""
    n_search, n_heldout = sizes(testbed, args)
    cfg = dict(model=args.model if testbed == "sd" else testbed, n_search=n_search,
               n_heldout=n_heldout, batch_size=args.batch_size, heldout_sets=args.heldout_sets)
    if testbed == "sd":
        cfg.update(prompts=args.prompts, ref_stats=args.ref_stats, inception=args.inception,
                   guidance=args.guidance)
    return cfg


def study_config(testbed: str, budget: int, seed: int, args) -> dict:
    cfg = dict(base_config(testbed, args), budget=budget, seed=seed, baselines=baselines(testbed))
    for key in ("trials", "teacher_steps", "distill_samples"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_json(path: Path, data) -> None:
    from schedsearch.files import atomic_write

    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def run_one(testbed: str, budget: int, seed: int, args, work: Path) -> dict:
    """One study in its own folder: read back if it finished, resumed if it was interrupted."""
    from schedsearch.config import StudyConfig
    from schedsearch.study import RunOptions, run_study

    cfg = study_config(testbed, budget, seed, args)
    out = work / f"{testbed}-{budget}nfe-seed{seed}"
    record = _read_json(out / RECORD)
    if record is not None and record["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(record["config"])
                      if cfg.get(k) != record["config"].get(k))
        raise SystemExit(f"{out} holds a study with other settings ({', '.join(diff)}); delete "
                         f"the folder or pass another --work")
    done = record is not None and record.get("finished") and (out / "summary.json").exists()
    if done and not args.rescore:
        print(f"  [{testbed} {budget} seed {seed}] finished earlier: {out}", flush=True)
        summary = _read_json(out / "summary.json")
    else:
        record = record or {"config": cfg, "wall_seconds": 0.0, "invocations": 0}
        # a finished study run again only picks its winner and re-scores it: its own clock
        clock = "rescore_seconds" if done else "wall_seconds"
        record["invocations"] += not done
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / RECORD, record)
        t0 = time.perf_counter()
        try:
            summary = run_study(StudyConfig.from_dict(cfg),
                                RunOptions(out=out, progress=False, export_user_preset=False,
                                           artifacts=args.artifacts),
                                echo=lambda m: print(f"  [{testbed} {budget} seed {seed}] {m}",
                                                     flush=True))
            record["finished"] = True
        finally:   # an interrupted invocation's time counts too (a SIGKILLed one's is lost)
            record[clock] = (0.0 if done else record[clock]) + time.perf_counter() - t0
            _write_json(out / RECORD, record)
        summary = json.loads(json.dumps(summary, default=str))
    summary.update(seed=seed, wall_seconds=record["wall_seconds"],
                   invocations=record["invocations"],
                   rescore_seconds=record.get("rescore_seconds"))
    summary.update(benchmark_report.study_details(out, summary))
    return summary


def curve_reference(testbed: str) -> str:
    """The baseline key the reference curve runs at every NFE: Karras DPM++2M on a DDPM model, a
    flow model's own default schedule with Euler (what its pipeline samples)."""
    return "flow" if is_flow(testbed) else "karras"


def curve_preset(ctx, reference: str, n: int):
    """The reference sampler at n steps, built as the study's baseline of that key
    (baselines._ddpm / _flow), so that the curve at the budget scores what that baseline does."""
    from schedsearch import schedules
    from schedsearch.presets import Preset

    t = ctx.model.table
    if reference == "flow":
        spec = {"name": "flow", "steps": n}
        return Preset(name=f"flow default euler @{n}", family=ctx.family, solver="euler",
                      sigmas=schedules.build(spec, t), guidance=ctx.guidance, schedule=spec)
    return Preset(name=f"karras {n}", family=ctx.family, solver="dpmpp_2m",
                  sigmas=schedules.karras(n, t.sigma_min, t.sigma_max), guidance=ctx.guidance)


def nfe_curve(testbed: str, args, work: Path) -> list[dict]:
    """The reference sampler (``curve_reference``) at every ``--curve-nfe``, scored on the
    studies' search subset and on the mean of their held-out sets (cached under --work)."""
    from schedsearch.config import StudyConfig
    from schedsearch.context import Context

    cfg, reference = base_config(testbed, args), curve_reference(testbed)
    cache = work / f"{testbed}-{reference}-curve.json"
    stored = _read_json(cache) or {"config": cfg, "rows": []}
    if stored["config"] != cfg:
        stored = {"config": cfg, "rows": []}
    rows = {r["nfe"]: r for r in stored["rows"]}
    missing = [n for n in args.curve_nfe if n not in rows]
    if missing:
        ctx = Context(StudyConfig.from_dict(cfg), echo=lambda m: None)
        for n in missing:
            e = curve_preset(ctx, reference, n)
            held = [ctx.score(e, which=f"heldout:{i}").fid for i in range(args.heldout_sets)]
            rows[n] = {"nfe": n, "fid": ctx.score(e).fid, "fid_heldout": sum(held) / len(held),
                       "fid_heldout_sets": held}
            print(f"  [{testbed}] {benchmark_report.LABELS[reference]} {n:>2} NFE: FID "
                  f"{rows[n]['fid']:.4g} / held-out {rows[n]['fid_heldout']:.4g}", flush=True)
            stored["rows"] = sorted(rows.values(), key=lambda r: r["nfe"])
            work.mkdir(parents=True, exist_ok=True)
            _write_json(cache, stored)
    return [rows[n] for n in args.curve_nfe]


def distill_cost(testbed: str, budget: int, args, work: Path) -> dict:
    """Teacher, GITS and OSS measured on their own, with a timer around every model call (kept
    under --work, like the studies)."""
    from schedsearch.config import StudyConfig

    defaults = StudyConfig()
    steps = args.teacher_steps or defaults.teacher_steps
    samples = args.distill_samples or defaults.distill_samples
    key = dict(base_config(testbed, args), budget=budget, teacher_steps=steps, samples=samples)
    cache = work / f"{testbed}-distill-cost.json"
    stored = _read_json(cache)
    if stored is not None and stored["config"] == key:
        return stored["cost"]
    cost = measure_distill(testbed, budget, steps, samples, args)
    _write_json(cache, {"config": key, "cost": cost})
    return cost


def measure_distill(testbed: str, budget: int, steps: int, samples: int, args) -> dict:
    from schedsearch import gits, models, oss, prompts, teacher

    model = TimedModel(models.load(args.model if testbed == "sd" else testbed))
    src = args.prompts if testbed == "sd" else models.DEFAULT_PROMPTS[testbed]
    pset = prompts.load(src, samples, 1)
    g = (models.default_guidance(model.family) if args.guidance is None or testbed != "sd"
         else args.guidance)
    out = {"teacher_steps": steps, "samples": samples, "budget": budget}
    t0 = time.perf_counter()
    tea = teacher.trajectories(model, pset.prompts, pset.seeds, guidance=g,
                               grid=teacher.TeacherGrid(steps=steps),
                               batch_size=args.batch_size, use_cache=False)
    out["teacher"] = {"wall_seconds": time.perf_counter() - t0, "model_seconds": model.seconds,
                      "image_model_calls": model.rows}
    for name, fn in (("gits", lambda: gits.search(tea, budget)),
                     ("oss", lambda: oss.search(model, tea, budget,
                                                batch_size=max(256, args.batch_size)))):
        model.seconds = model.rows = 0
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        out[name] = {"wall_seconds": wall, "model_seconds": model.seconds,
                     "image_model_calls": model.rows,
                     "share_outside_model": (1 - model.seconds / wall) if model.rows else None}
    return out


def run_testbed(testbed: str, args, work: Path, out: Path) -> dict:
    print(f"== {testbed}", flush=True)
    studies = {str(b): {str(s): run_one(testbed, b, s, args, work)
                        for s in range(args.study_seeds)} for b in args.budgets}
    curve, reference = nfe_curve(testbed, args, work), curve_reference(testbed)
    budgets = {b: benchmark_report.aggregate(int(b), list(per_seed.values()))
               for b, per_seed in studies.items()}
    benchmark_report.plot_fid_vs_nfe(testbed, curve, reference, budgets,
                                     out / f"fid_vs_nfe_{testbed}.png")
    benchmark_report.plot_sigmas(testbed, budgets, out / f"winners_sigmas_{testbed}.png")
    cost_budget = 5 if 5 in args.budgets else args.budgets[0]
    return {"budgets": budgets, "studies": studies, "curve": curve,
            "curve_reference": {"key": reference, "label": benchmark_report.LABELS[reference]},
            "distill_cost": distill_cost(testbed, cost_budget, args, work)}


def update_readme(block: str, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no <!-- results:begin --> ... <!-- results:end --> block")
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text),
                      encoding="utf-8")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="+", default=["digits", "gmm"],
                    choices=["digits", "gmm", "digits-flow", "gmm-flow", "sd"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[3, 4, 5, 6, 8])
    ap.add_argument("--study-seeds", type=int, default=3,
                    help="studies per testbed and budget, with search seeds 0, 1, … (default 3)")
    ap.add_argument("--heldout-sets", type=int, default=3,
                    help="disjoint held-out sets the winner and baselines are re-scored on")
    ap.add_argument("--trials", type=int, help="trials per study (default: the study default)")
    ap.add_argument("--n-search", type=int, help="images per candidate (default: "
                    + ", ".join(f"{k} {v}" for k, v in N_DEFAULT.items()) + ")")
    ap.add_argument("--n-heldout", type=int, help="images per held-out set (default: as --n-search)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--teacher-steps", type=int, help="GITS/OSS teacher (default: the study's)")
    ap.add_argument("--distill-samples", type=int, help="GITS/OSS samples (default: the study's)")
    ap.add_argument("--curve-nfe", nargs="+", type=int, default=list(CURVE_NFE),
                    help="step counts of the reference curve: Karras DPM++2M (on the flow "
                         "testbeds: the model's default schedule with Euler)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                    + "; work and out under <work>/quick, README untouched unless --readme")
    ap.add_argument("--model", help="sd testbed: an SD1.x/2.x/XL checkpoint (hub id, folder, "
                                    ".safetensors); SD3/FLUX: run schedsearch run on them")
    ap.add_argument("--prompts")
    ap.add_argument("--ref-stats")
    ap.add_argument("--inception")
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--artifacts", action="store_true",
                    help="log each study's sample grids and figures to its MLflow store (off: "
                         "the benchmark needs the numbers only)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: torch's); 1 on a machine shared with other "
                         "jobs, where spinning OpenMP threads slow every model call down")
    ap.add_argument("--rescore", action="store_true",
                    help="finalize finished studies again with the current code (the winner's "
                         "choice on fresh seeds, held-out re-scoring) without re-running a "
                         "trial: after a change to how the winner is picked")
    ap.add_argument("--work", default=str(ROOT / "analysis" / "results" / "runs"),
                    help="one folder per study (and the curve and distillation costs), kept so that a rerun resumes")
    ap.add_argument("--out", help="results (default: analysis/results)")
    ap.add_argument("--readme", help="README to rewrite (default: README.md; '' to leave it)")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) in (None, ap.get_default(key)):
                setattr(args, key, value)
        args.work = str(Path(args.work) / "quick")
    args.out = args.out or str(Path(args.work) / "results" if args.quick
                               else ROOT / "analysis" / "results")
    if args.readme is None:
        args.readme = "" if args.quick else str(ROOT / "README.md")
    if "sd" in args.testbeds and not (args.model and args.prompts and args.ref_stats):
        ap.error("the sd testbed needs --model, --prompts and --ref-stats")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("budgets", "study_seeds", "heldout_sets", "trials", "batch_size", "teacher_steps",
            "distill_samples", "curve_nfe", "quick")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["images"] = {tb: dict(zip(("search", "heldout"), sizes(tb, args)))
                     for tb in args.testbeds}
    results = {"config": cfg, "testbeds": {}}
    t_all = time.perf_counter()
    for tb in args.testbeds:
        results["testbeds"][tb] = run_testbed(tb, args, work, out)
    import torch

    from schedsearch import __version__
    results["seconds"] = time.perf_counter() - t_all   # this invocation's, read-backs included
    # what the results cost, however many invocations made them (a re-render reads them back)
    results["study_wall_seconds"] = sum(
        s["wall_seconds"] for tb in results["testbeds"].values()
        for seeds in tb["studies"].values() for s in seeds.values())
    results["environment"] = {"schedsearch": __version__, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    _write_json(out / "benchmark.json", results)
    # benchmark.md sits next to its figures; README's block links them from README's folder
    (out / "benchmark.md").write_text(benchmark_report.markdown(results, ".") + "\n",
                                      encoding="utf-8")
    block = benchmark_report.markdown(results, os.path.relpath(
        out, Path(args.readme).resolve().parent if args.readme else ROOT).replace(os.sep, "/"))
    if args.readme:
        update_readme(block, Path(args.readme))
    print(block)
    print(f"total {results['seconds'] / 60:.1f} min (the studies: "
          f"{results['study_wall_seconds'] / 60:.1f} min); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
