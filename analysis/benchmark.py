"""Search quality and search cost against every baseline, side by side in one run.

For each testbed and NFE budget: a study (``schedsearch run``'s own code) plus every baseline on the
same prompts and seeds — FID proxy on the search subset and on held-out prompts/seeds; the
FID-vs-NFE curve of Karras DPM++2M from 4 to 50 steps with the found schedules on it; and what each
method costs (model calls, wall time, share of time outside model calls).

    python analysis/benchmark.py                 # everything in README's results section
    python analysis/benchmark.py --quick         # a small smoke run (fewer trials and images)
    python analysis/benchmark.py --model PATH --prompts captions.json --ref-stats ref.safetensors \
        --testbeds sd --budgets 5                # a real Stable Diffusion checkpoint

Writes analysis/results/benchmark.{json,md}, fid_vs_nfe_<testbed>.png, and rewrites the block
between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
CURVE_NFE = (4, 5, 6, 8, 10, 12, 15, 20, 30, 50)


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


# the mixture's model calls are nearly free, so it affords subsets large enough for FID to settle
N_DEFAULT = {"digits": 200, "gmm": 1000, "sd": 500}


def sizes(testbed: str, args) -> tuple[int, int]:
    n = args.n_search or N_DEFAULT[testbed]
    return n, args.n_heldout or n


def run_budget(testbed: str, budget: int, args, work: Path) -> dict:
    from schedsearch.config import StudyConfig
    from schedsearch.study import RunOptions, run_study

    n_search, n_heldout = sizes(testbed, args)
    cfg = dict(model=args.model if testbed == "sd" else testbed, budget=budget, trials=args.trials,
               n_search=n_search, n_heldout=n_heldout, batch_size=args.batch_size,
               baselines=["karras", "karras20", "paper", "ays", "gits", "oss"],
               teacher_steps=args.teacher_steps, distill_samples=args.distill_samples,
               seed=args.seed)
    if testbed == "sd":
        cfg.update(prompts=args.prompts, ref_stats=args.ref_stats, inception=args.inception,
                   guidance=args.guidance)
    out = work / f"{testbed}-{budget}"
    t0 = time.perf_counter()
    summary = run_study(StudyConfig.from_dict(cfg),
                        RunOptions(out=out, progress=False, export_user_preset=False),
                        echo=lambda m: print(f"  [{testbed} {budget}] {m}", flush=True))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["study_cost"] = study_cost(out, summary["study"])
    return summary


def study_cost(out: Path, name: str) -> dict:
    """Model calls and time of the study's trials, from what each trial recorded."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    calls = model_s = total_s = 0.0
    for t in study.get_trials(deepcopy=False):
        res = t.user_attrs.get("result")
        cand = t.user_attrs.get("candidate")
        if res and cand:
            calls += res["n"] * cand["nfe"]
            model_s += res["seconds"].get("model", 0.0)
            total_s += res["seconds"].get("total", 0.0)
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete and t.datetime_start]
    wall = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return {"image_model_calls": calls, "trial_wall_seconds": wall, "model_seconds": model_s,
            "scoring_seconds": total_s, "share_outside_model": 1 - model_s / wall if wall else None}


def distill_cost(testbed: str, budget: int, args) -> dict:
    """Teacher, GITS and OSS measured on their own, with a timer around every model call."""
    from schedsearch import gits, models, oss, prompts, teacher
    from schedsearch.models import default_guidance

    model = TimedModel(models.load(args.model if testbed == "sd" else testbed))
    src = args.prompts if testbed == "sd" else ("classes:10" if testbed == "digits" else "classes:4")
    pset = prompts.load(src, args.distill_samples, 1)
    g = default_guidance(model.family) if args.guidance is None or testbed != "sd" else args.guidance
    grid = teacher.TeacherGrid(steps=args.teacher_steps)
    out = {}
    t0 = time.perf_counter()
    tea = teacher.trajectories(model, pset.prompts, pset.seeds, guidance=g, grid=grid,
                               batch_size=args.batch_size, use_cache=False)
    out["teacher"] = {"wall_seconds": time.perf_counter() - t0, "model_seconds": model.seconds,
                      "image_model_calls": model.rows}
    for name, fn in (("gits", lambda: gits.search(tea, budget)),
                     ("oss", lambda: oss.search(model, tea, budget, batch_size=max(256, args.batch_size)))):
        model.seconds = model.rows = 0
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        out[name] = {"wall_seconds": wall, "model_seconds": model.seconds,
                     "image_model_calls": model.rows,
                     "share_outside_model": (1 - model.seconds / wall) if model.rows else None}
    return out


def nfe_curve(testbed: str, args, budgets_summaries: dict) -> list[dict]:
    """Karras DPM++2M from 4 to 50 steps, scored on the same search and held-out sets."""
    from schedsearch import schedules
    from schedsearch.config import StudyConfig
    from schedsearch.context import Context
    from schedsearch.presets import Preset

    n_search, n_heldout = sizes(testbed, args)
    cfg = StudyConfig.from_dict(dict(model=args.model if testbed == "sd" else testbed,
                                     n_search=n_search, n_heldout=n_heldout,
                                     batch_size=args.batch_size,
                                     **({"prompts": args.prompts, "ref_stats": args.ref_stats,
                                         "inception": args.inception, "guidance": args.guidance}
                                        if testbed == "sd" else {})))
    ctx = Context(cfg, echo=lambda m: None)
    t = ctx.model.table
    rows = []
    for n in args.curve_nfe:
        e = Preset(name=f"karras {n}", family=ctx.family,
                   sigmas=schedules.karras(n, t.sigma_min, t.sigma_max), solver="dpmpp_2m",
                   guidance=ctx.guidance)
        s, h = ctx.score(e), ctx.score(e, which="heldout")
        rows.append({"nfe": n, "fid": s.fid, "fid_heldout": h.fid})
        print(f"  [{testbed}] karras dpm++2m {n:>2} NFE: FID {s.fid:.3f} / held-out {h.fid:.3f}", flush=True)
    return rows


def plot_curve(testbed: str, curve: list[dict], summaries: dict, path: Path) -> None:
    nfes = [r["nfe"] for r in curve]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    ax.plot([r["nfe"] for r in curve], [r["fid_heldout"] for r in curve], "o-", color="0.3",
            label="Karras DPM++2M")
    marks = {"best": ("*", "tab:red", 14, "found (schedsearch)"), "paper": ("s", "tab:blue", 7, "paper preset"),
             "ays": ("^", "tab:green", 7, "AYS"), "gits": ("v", "tab:purple", 7, "GITS"),
             "oss": ("D", "tab:orange", 6, "OSS")}
    seen = set()
    for budget, summ in sorted(summaries.items()):
        for r in summ.get("rows", []):
            if r["key"] in marks:
                m, c, s, label = marks[r["key"]]
                ax.plot(r["nfe"], r["fid_heldout"], m, color=c, ms=s,
                        label=None if r["key"] in seen else label)
                seen.add(r["key"])
    ax.set_xscale("log")
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("model calls per image (NFE)")
    ax.set_ylabel("FID proxy, held-out prompts/seeds (lower is better)")
    ax.set_title(f"{testbed}: FID vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = []
    for testbed, data in results["testbeds"].items():
        lines.append(f"#### {testbed}: FID proxy by method (search subset / held-out)\n")
        lines.append("| budget | method | NFE | FID search | FID held-out | KID held-out |")
        lines.append("|---|---|---|---|---|---|")
        for budget, summ in sorted(data["budgets"].items(), key=lambda kv: int(kv[0])):
            for r in summ["rows"]:
                star = "★ " if r.get("recommended") else ""
                lines.append(f"| {budget} | {star}{r['name']} | {r['nfe']} | {r['fid']:.3f} | "
                             f"{r['fid_heldout']:.3f} | {r['kid_heldout']:.4f} |")
        lines.append("")
        lines.append("★ marks what `schedsearch run` recommends: the best of the found schedule and "
                     "every baseline at the same NFE, by FID on the search subset (held-out is the check).\n")
        lines.append("| budget | found / Karras@20 (held-out) | found / Karras@budget (held-out) | "
                     "found / best baseline at budget (held-out) |")
        lines.append("|---|---|---|---|")
        for budget, summ in sorted(data["budgets"].items(), key=lambda kv: int(kv[0])):
            rows = {r["key"]: r for r in summ["rows"]}
            best = rows["best"]["fid_heldout"]
            at_budget = [r["fid_heldout"] for k, r in rows.items()
                         if k not in ("best", "karras20") and r["nfe"] == int(budget)]
            lines.append(f"| {budget} | {best / rows['karras20']['fid_heldout']:.2f} | "
                         f"{best / rows['karras']['fid_heldout']:.2f} | "
                         f"{best / min(at_budget):.2f} |")
        lines.append("")
        lines.append(f"![FID vs NFE on {testbed}](analysis/results/fid_vs_nfe_{testbed}.png)\n")
        lines.append(f"#### {testbed}: search cost (budget {data['cost_budget']})\n")
        lines.append("| method | image·model calls | wall time (s) | time outside model calls |")
        lines.append("|---|---|---|---|")
        sc = data["budgets"][str(data["cost_budget"])]["study_cost"]
        lines.append(f"| study ({results['config']['trials']} trials, scoring included) | "
                     f"{sc['image_model_calls']:.0f} | {sc['trial_wall_seconds']:.1f} | "
                     f"{100 * sc['share_outside_model']:.1f}% |")
        dc = data["distill_cost"]
        lines.append(f"| teacher ({results['config']['teacher_steps']} steps × "
                     f"{results['config']['distill_samples']} samples) | {dc['teacher']['image_model_calls']} | "
                     f"{dc['teacher']['wall_seconds']:.1f} | "
                     f"{100 * (1 - dc['teacher']['model_seconds'] / dc['teacher']['wall_seconds']):.1f}% |")
        for k in ("gits", "oss"):
            share = dc[k]["share_outside_model"]
            lines.append(f"| {k.upper()} (after the teacher) | {dc[k]['image_model_calls']} | "
                         f"{dc[k]['wall_seconds']:.2f} | {'n/a (no model calls)' if share is None else f'{100 * share:.1f}%'} |")
        lines.append("")
    return "\n".join(lines)


def update_readme(block: str, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no <!-- results:begin --> ... <!-- results:end --> block")
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="+", default=["digits", "gmm"], choices=["digits", "gmm", "sd"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[4, 5, 6, 8])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--n-search", type=int, help="images per candidate (default: digits 200, "
                                                   "gmm 1000, sd 500)")
    ap.add_argument("--n-heldout", type=int, help="held-out images (default: as --n-search)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--teacher-steps", type=int, default=100)
    ap.add_argument("--distill-samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve-nfe", nargs="+", type=int, default=list(CURVE_NFE),
                    help="step counts of the Karras DPM++2M reference curve")
    ap.add_argument("--quick", action="store_true", help="8 trials, 64 images: a smoke run")
    ap.add_argument("--model", help="sd testbed: a checkpoint (hub id, folder, .safetensors)")
    ap.add_argument("--prompts"), ap.add_argument("--ref-stats"), ap.add_argument("--inception")
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="'' to leave README alone")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.n_search, args.n_heldout, args.batch_size = 8, 64, 64, 64
    if "sd" in args.testbeds and not (args.model and args.prompts and args.ref_stats):
        raise SystemExit("the sd testbed needs --model, --prompts and --ref-stats")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="schedsearch-bench-"))
    cfg = {k: getattr(args, k) for k in ("budgets", "trials", "batch_size", "teacher_steps",
                                          "distill_samples", "seed")}
    cfg["images"] = {tb: dict(zip(("search", "heldout"), sizes(tb, args))) for tb in args.testbeds}
    results = {"config": cfg, "testbeds": {}}
    t_all = time.perf_counter()
    try:
        for tb in args.testbeds:
            print(f"== {tb}", flush=True)
            budgets = {str(b): run_budget(tb, b, args, work) for b in args.budgets}
            cost_budget = 5 if 5 in args.budgets else args.budgets[0]
            curve = nfe_curve(tb, args, budgets)
            plot_curve(tb, curve, budgets, out / f"fid_vs_nfe_{tb}.png")
            results["testbeds"][tb] = {"budgets": budgets, "curve": curve, "cost_budget": cost_budget,
                                       "distill_cost": distill_cost(tb, cost_budget, args)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    from schedsearch import __version__
    results["seconds"] = time.perf_counter() - t_all
    results["environment"] = {"schedsearch": __version__, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    (out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    block = markdown(results)
    (out / "benchmark.md").write_text(block + "\n")
    if args.readme:
        update_readme(block, Path(args.readme))
    print(block)
    print(f"total {results['seconds'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
