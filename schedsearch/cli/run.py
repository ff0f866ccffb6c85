"""``schedsearch run``: search the best schedule at an NFE budget."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..config import (FLOW_BASELINES, MIN_TRIALS, SD_BASELINES, SD_ONLY, TRIALS_PER_NFE,
                      StudyConfig, default_study_name, default_trials)
from ..presets import read
from ..report import comparison_markdown, pareto_markdown
from ..study import RunOptions, run_study
from . import UserError, options


def register(sub) -> None:
    p = options.command(
        sub, "run", help="search the best schedule for a model at an NFE budget (the main job)",
        description="Search the sampling schedule at a fixed number of model calls: the "
                    "baselines (Karras, AYS, GITS, OSS, the paper's presets) are scored first and "
                    "the best of them start the search; a global stage (TPE by default) explores "
                    "the paper's family (p1, p2, stop) and free-form σ lists, the solver and "
                    "FreeU; a local stage refines the best with CMA-ES. Every candidate is scored "
                    "with the FID proxy on the same prompts and seeds; the best few meet fresh "
                    "seeds before one wins; the winner and every baseline are re-scored on "
                    "held-out prompts (paired 95% CI); everything goes to MLflow and the winner "
                    "becomes a preset. With no arguments it runs on the built-in 'digits' "
                    "testbed. Re-running the same command continues the study.",
        examples=["schedsearch run --budget 5",
                  "schedsearch run --config studies/sd15-coco-5.yaml --model "
                  "sd-legacy/stable-diffusion-v1-5 \\\n"
                  "      --prompts captions_val2014.json --ref-stats coco-val-512.safetensors",
                  "schedsearch run --storage postgresql://u:p@host/db --study-name s1   "
                  "# on N machines"])
    p.add_argument("--budget", type=int, help="model calls (NFE) per image (default 5)")
    p.add_argument("--config", metavar="YAML", help="a study config (see studies/); flags override it")
    options.model(p, default=None)
    options.sd_model(p)
    options.prompts(p, default_seed=None)
    p.add_argument("--n-search", type=int, help="images per candidate (the search subset)")
    p.add_argument("--n-heldout", type=int, help="images of the held-out check")
    _search_options(p)
    p.add_argument("--timeout", type=float, help="stop taking new trials after this many seconds")
    p.add_argument("--sampler", choices=["tpe", "cmaes", "gp", "random"],
                   help="Optuna sampler of the global stage (default tpe; cmaes and gp model only "
                        "the parameters every trial shares)")
    p.add_argument("--seed", type=int, help="the search's seed (default 0)")
    options.guidance(p, first="the --config file's")
    p.add_argument("--objectives", help="fid (default), fid,nfe or fid,clip (multi-objective, Pareto front)")
    p.add_argument("--baselines",
                   help=f"comma-separated subset of {','.join(SD_BASELINES)} (DDPM models) or "
                        f"{','.join(FLOW_BASELINES)} (flow-matching models); default: all that "
                        f"apply")
    options.scoring(p)
    options.batch_size(p, None)
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default: sqlite in --out)")
    p.add_argument("--study-name", help="study name: letters, digits and . _ + - (default: "
                                        "<model>-<budget>nfe); it also names the run folder and "
                                        "the preset")
    p.add_argument("--out", help="output folder (default: schedsearch-runs/<study name>)")
    options.progress(p)
    p.add_argument("--no-user-preset", action="store_true",
                   help="do not copy the winner into the user preset folder")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between trial heartbeats (default 10)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds without heartbeat before a trial counts as abandoned and is "
                        "re-queued (more than --heartbeat; default 30)")
    p.add_argument("--no-artifacts", action="store_true",
                   help="log metrics and params only: no per-run plots, grids or preset files "
                        "(for very cheap models, where they cost more than sampling)")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON: stdout holds only it, the study's progress "
                        "lines go to stderr, and the exit status is 2 if no trial completed")
    p.set_defaults(handler=run)


def _search_options(p) -> None:
    """How the study spends its trials and picks its winner, in their own --help section."""
    g = p.add_argument_group("how the trials are spent and the winner is picked")
    g.add_argument("--trials", type=int,
                   help=f"number of trials in the study (default: {TRIALS_PER_NFE} per model call, "
                        f"at least {MIN_TRIALS}; {default_trials(5)} at budget 5); on a study that "
                        f"exists, a larger number adds trials to its last local run")
    g.add_argument("--refine", type=float, metavar="FRACTION",
                   help=f"share of the first {MIN_TRIALS} trials in the local stage around the "
                        f"global stage's best; every trial beyond them is local too, unless 0 "
                        f"(default {StudyConfig.refine})")
    g.add_argument("--refine-starts", type=int, metavar="N",
                   help=f"at most N CMA-ES runs share the local stage: around the global stage's "
                        f"best, then around the best free-form trial of each other solver "
                        f"(default {StudyConfig.refine_starts})")
    g.add_argument("--refine-margin", type=float, metavar="SHARE",
                   help=f"a further local run starts only from a trial whose search FID is within "
                        f"this share of the best's (default {StudyConfig.refine_margin})")
    g.add_argument("--heldout-sets", type=int, metavar="K",
                   help=f"disjoint held-out seed sets the winner is re-scored on "
                        f"(default {StudyConfig.heldout_sets})")
    g.add_argument("--validation-sets", type=int, metavar="V",
                   help=f"fresh seed sets the best few trials and the best warm start are "
                        f"re-scored on before one wins (default {StudyConfig.validation_sets})")


# flag → config key, for the flags that override a study config
OVERRIDES = ("budget", "model", "prompts", "prompt_seed", "caption_column", "n_search",
             "n_heldout", "trials", "refine", "refine_starts", "refine_margin", "heldout_sets",
             "validation_sets", "sampler", "seed", "guidance", "ref_stats", "extractor",
             "inception", "clip", "batch_size", "device", "dtype", *SD_ONLY)


# what only a single-objective study uses: the local (CMA-ES) stage and the winner's re-scoring
SINGLE_OBJECTIVE = ("refine", "refine_starts", "refine_margin", "validation_sets")


def _names(text, flag: str):
    """'fid, NFE' → ['fid', 'nfe']: a comma list as people type it (None when not given). An
    empty one is a mistake (an unset shell variable), not a request for the default."""
    if text is None:
        return None
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{flag} is empty: name at least one, or leave the flag out for the "
                         f"default")
    return names


def config_from_args(args):

    overrides = {k: getattr(args, k) for k in OVERRIDES}
    overrides["objectives"] = _names(args.objectives, "--objectives")
    overrides["baselines"] = _names(args.baselines, "--baselines")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = (StudyConfig.from_file(args.config, **overrides) if args.config
              else StudyConfig.from_dict(overrides))
    if len(config.objectives) > 1:   # these flags were dropped without a word
        unused = [f"--{k.replace('_', '-')}" for k in SINGLE_OBJECTIVE
                  if getattr(args, k) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)}: for a single-objective study; --objectives "
                             f"{','.join(config.objectives)} runs one stage, and its front's "
                             f"lowest FID is re-scored on held-out only")
    return config, args.study_name or default_study_name(config)


def run(args) -> int:
    config, name = config_from_args(args)
    out = Path(args.out or Path("schedsearch-runs") / name)
    opts = RunOptions(out=out, storage=args.storage, study_name=name, timeout=args.timeout,
                      heartbeat=args.heartbeat, grace=args.grace, progress=not args.no_progress,
                      artifacts=not args.no_artifacts,
                      export_user_preset=not args.no_user_preset)
    # under --json stdout is the summary alone: the study's progress lines go to stderr
    echo = (lambda text: print(text, file=sys.stderr)) if args.json else print
    summary = run_study(config, opts, echo)
    if args.json:   # the summary on stdout even when nothing completed; the exit status says so
        print(json.dumps(summary, indent=2, default=str))
    else:
        for key, why in summary.get("failed_baselines", {}).items():
            print(f"warning: baseline {key} failed and is missing from the comparison: {why}")
    if not summary.get("rows"):
        reasons = summary.get("fail_reasons") or ["none finished (stopped by --timeout?)"]
        raise UserError(f"no trial of study {name!r} completed; failures: {'; '.join(reasons[:3])}"
                        f" — see {out} and the MLflow runs")
    if args.json:
        return 0
    print()
    print(comparison_markdown(summary["rows"]))
    print()
    if "pareto_front" in summary:
        print(pareto_markdown(summary))
        print()
    print(f"best trial: {summary['best_trial']}  {json.dumps(summary['best_params'])}")
    for line in verdict(summary["rows"]):
        print(line)
    if summary["finished"] < config.trials:   # a result so far, not the study's: say so
        print(f"  stopped by --timeout after {summary['finished']} of {config.trials} trials: "
              f"the same command continues the study")
    print(f"preset: {summary['preset']}")
    # what the preset holds, in the terms a sampler takes (the trial's params are knot fractions)
    chosen = read(summary["preset"])
    print(f"        σ {', '.join(f'{v:.4g}' for v in chosen.sigmas.tolist())} · {chosen.solver}"
          f" · FreeU {chosen.freeu_text()} · guidance {chosen.guidance:.4g}")
    if summary.get("user_preset"):
        print(f"        also saved as '{name}' (schedsearch presets show {name})")
    if summary.get("warning"):
        print(f"warning: {summary['warning']}")
    print(f"dashboard: schedsearch ui --out {shlex.quote(str(out))}   (it prints the runs table's "
          f"URL)")
    return 0


def verdict(rows: list[dict]) -> list[str]:
    """What to use, and whether the held-out check says the winner is better than the best
    same-NFE baseline beyond the noise of the proxy."""
    rec = next(r for r in rows if r.get("recommended"))
    best = rows[0]
    if rec["key"] == "best":
        lines = [f"★ recommended: the best trial (FID {rec['fid']:.3f}, held-out "
                 f"{rec['fid_heldout']:.3f})"]
    else:
        where = (f"on fresh seeds (validation FID {rec['fid_validation']:.3f} against "
                 f"{best['fid_validation']:.3f})" if "fid_validation" in rec
                 else f"on the search subset (FID {rec['fid']:.3f})")
        lines = [f"★ recommended: {rec['name']} — no searched schedule beat this baseline at "
                 f"{rec['nfe']} NFE {where}; held-out {rec['fid_heldout']:.3f}"]
    rivals = [r for r in rows[1:] if r["nfe"] == best["nfe"] and r.get("vs_best")]
    if rivals:
        top = min(rivals, key=lambda r: r["fid"])
        ci = top["vs_best"]
        word = ("better than" if ci["hi"] < 0 else "worse than" if ci["lo"] > 0
                else "not distinguishable from")
        lines.append(f"  held-out: the best trial is {word} {top['name']}, the best baseline at "
                     f"{best['nfe']} NFE: FID difference {ci['delta']:+.3f}, 95% CI "
                     f"[{ci['lo']:+.3f}, {ci['hi']:+.3f}] over {ci['sets']} seed set(s)")
    return lines
