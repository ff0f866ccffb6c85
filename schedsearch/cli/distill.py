"""``schedsearch teacher``, ``schedsearch oss`` and ``schedsearch gits``: teacher trajectories and
the schedules distilled from them (docs/baselines.md). Each prints a JSON summary on stdout; the
progress bar goes to stderr."""

from __future__ import annotations

import json
import sys

from tqdm.auto import tqdm

from .. import gits, models, oss, prompts as prompt_sets
from ..sampler import check_seeds
from ..schedules import build
from ..solvers import canonical, model_calls
from ..teacher import TeacherGrid, error_vs_teacher, trajectories
from . import options


def _common(p) -> None:
    options.model(p)
    options.sd_model(p)
    options.prompts(p)
    p.add_argument("--n", type=int, default=None,
                   help="number of (prompt, seed) pairs (default 64, or the number of --seeds)")
    p.add_argument("--seeds", default=None,
                   help="explicit seeds, one per pair: comma-separated, ranges a-b allowed")
    p.add_argument("--teacher-steps", type=int, default=100, help="teacher steps N (default 100)")
    p.add_argument("--teacher-grid", choices=["uniform", "karras", "logsnr"], default="uniform",
                   help="teacher grid spacing: uniform in t (default), karras (rho 7), logsnr")
    p.add_argument("--teacher-end", default="zero",
                   help="data end of the grid: zero (default; σ_min then 0), sigma_min, or a σ > 0")
    options.guidance(p)
    options.batch_size(p, 64)
    p.add_argument("--cache-dir", default=None,
                   help="teacher cache folder (default $SCHEDSEARCH_CACHE/teacher or "
                        "~/.cache/schedsearch/teacher)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    options.progress(p)


def _distiller(sub, name: str, *, help: str, description: str, example: str):
    """The oss / gits parsers: the common flags, the budget, the scoring solver, held-out pairs."""
    p = options.command(sub, name, help=help, description=description, examples=[example])
    _common(p)
    p.add_argument("--budget", type=int, required=True, metavar="M",
                   help="student steps M = model calls per image (must be < --teacher-steps)")
    p.add_argument("--solver", default="dpmpp_1s",
                   help="solver used to score the schedule against the teacher (default dpmpp_1s)")
    p.add_argument("--heldout", type=int, default=0, metavar="K",
                   help="also score on K held-out pairs (the next K of the prompt set; "
                        "costs a teacher on them)")
    return p


def register(sub) -> None:
    t = options.command(
        sub, "teacher", help="compute (or load from cache) teacher trajectories",
        description="Fine first-order (DPM++1S) trajectories on the model's own grid for each "
                    "(prompt, seed) pair, cached on disk. OSS and GITS are distilled from them.",
        examples=["schedsearch teacher --model gmm --n 64 --teacher-steps 100"])
    _common(t)
    t.set_defaults(handler=run_teacher, heldout=0, budget=None)

    o = _distiller(
        sub, "oss", help="OSS: optimal stepsizes by dynamic programming against a teacher",
        description="Optimal Stepsize Search (Pei, Hu, Gu: \"Optimal Stepsize for Diffusion "
                    "Sampling\"): per sample, a DP over the teacher grid on the student's own "
                    "states; one schedule per model by the per-position median.",
        example="schedsearch oss --budget 5 --model gmm")
    o.add_argument("--free-start", action="store_true",
                   help="let a path start below σ_max (the reference implementation's behaviour)")
    o.add_argument("--calibrate", action="store_true",
                   help="amplitude calibration during the search (5%%/95%% quantiles)")
    o.set_defaults(handler=run_oss)

    g = _distiller(
        sub, "gits", help="GITS: K-step shortest path on the teacher's one-jump cost matrix",
        description="Geometry-inspired time scheduling (Chen et al., ICML 2024): no model calls "
                    "beyond the teacher.",
        example="schedsearch gits --budget 5 --coeff 1.2 --model gmm")
    g.add_argument("--coeff", type=float, default=1.2,
                   help="weight growth per step toward the data (default 1.2; > 1 favours small "
                        "steps at low noise)")
    g.set_defaults(handler=run_gits)


# -- helpers ---------------------------------------------------------------------------------------

def _grid(args):

    end = args.teacher_end
    if end not in ("zero", "sigma_min"):
        try:
            end = float(end)
        except ValueError:
            raise ValueError(f"--teacher-end must be zero, sigma_min or a number, "
                             f"got {end!r}") from None
    return TeacherGrid(args.teacher_grid, args.teacher_steps, end)


def _setup(args):
    """Model, the (prompts, seeds) pairs, the held-out pairs (maybe empty), guidance, grid."""

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.no_cache and args.cache_dir:
        raise ValueError("--no-cache neither reads nor writes the cache: drop --cache-dir, or "
                         "--no-cache to use that folder")
    heldout = args.heldout
    if heldout < 0:
        raise ValueError(f"--heldout must be >= 0, got {heldout}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # the student's flags are checked before the teacher, which on a real model takes minutes
    budget = args.budget
    if budget is not None and budget < 1:
        raise ValueError(f"--budget must be >= 1 (model calls per image), got {budget}")
    if getattr(args, "solver", None) is not None:
        args.solver = canonical(args.solver)
    if getattr(args, "coeff", None) is not None:
        gits.check_coeff(args.coeff)
    if budget is not None and budget >= args.teacher_steps:
        raise ValueError(f"--budget {budget} must be smaller than --teacher-steps "
                         f"{args.teacher_steps}")
    grid = _grid(args)
    seeds = options.int_list(args.seeds, "--seeds") if args.seeds is not None else None
    check_seeds(seeds or ())
    source = models.prompt_source(args.model, args.prompts)   # before a pipeline takes minutes
    n = args.n if args.n is not None else (len(seeds) if seeds is not None else 64)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"--seeds gives {len(seeds)} seeds for --n {n} pairs; give one per pair")
    if seeds is not None and heldout:
        raise ValueError("--heldout takes its pairs from the prompt set's own seeds; "
                         "drop --seeds to use it")
    if heldout:
        main, rest = prompt_sets.split(source, n, heldout, args.prompt_seed,
                                       caption_column=args.caption_column or "caption")
    else:
        main, rest = prompt_sets.load(source, n, args.prompt_seed,
                                      caption_column=args.caption_column or "caption"), None
    pairs = (list(main.prompts), seeds if seeds is not None else list(main.seeds))
    held = (list(rest.prompts), list(rest.seeds)) if rest is not None else None
    model = options.load_model(args)
    models.check_prompts(model, pairs[0] + (held[0] if held else []), source)
    guidance = args.guidance if args.guidance is not None else models.default_guidance(model.family)
    # the set's name says which seeds ran: with --seeds, not the prompt seed's
    name = main.source if seeds is None else (f"{main.source.rsplit('@seed', 1)[0]} with "
                                              f"--seeds {args.seeds}")
    return model, name, pairs, held, guidance, grid


def _bar(args, total: int, desc: str):

    # None: off when stderr is not a terminal (a log file gets no bar redrawn in place)
    return tqdm(total=total, desc=desc, unit="img", disable=args.no_progress or None,
                file=sys.stderr, dynamic_ncols=True)


def _teacher(args, model, pairs, guidance, grid, desc="teacher"):

    with _bar(args, len(pairs[1]) * grid.steps, desc) as bar:
        return trajectories(model, pairs[0], pairs[1], guidance=guidance, grid=grid,
                            cache=args.cache_dir, use_cache=not args.no_cache,
                            batch_size=args.batch_size, progress=bar)


def _score(args, model, sigmas, teacher, desc):

    with _bar(args, len(teacher.seeds), desc) as bar:
        err = error_vs_teacher(model, sigmas, teacher, solver=args.solver,
                               batch_size=args.batch_size, progress=bar)
    return {"mse": float(err.mean()), "rmse": float(err.mean().sqrt()), "samples": len(err),
            "calls_per_sample": model_calls(args.solver, sigmas)}


def _summary(args, result, teacher, source, model, held, guidance, grid) -> dict:

    out = {"method": result.provenance["method"], "model": args.model,
           "model_fingerprint": model.fingerprint(), "budget": result.steps,
           "sigmas": result.sigmas.tolist(), "grid_indices": result.provenance["grid_indices"],
           "guidance": guidance, "prompts": source, "samples": len(teacher.seeds),
           "teacher": {"steps": teacher.steps, "grid": grid.as_json(), "cache": teacher.path,
                       "from_cache": teacher.calls == 0},
           "model_calls_per_sample": dict(result.provenance["calls_per_sample"],
                                          teacher_this_run=teacher.calls)}
    # Karras ρ = 7 at the same budget, built against the model's own table (on a flow model a
    # ramp in t from σ = ∞, docs/flow.md)
    baseline = build({"name": "karras", "steps": result.steps}, model.table)
    out["error_vs_teacher"] = _score(args, model, result.sigmas, teacher, "score")
    out["karras_error_vs_teacher"] = _score(args, model, baseline, teacher, "karras")
    if held is not None:
        held_teacher = _teacher(args, model, held, guidance, grid, "held-out teacher")
        out["heldout"] = {"samples": len(held[1]),
                          "error_vs_teacher": _score(args, model, result.sigmas, held_teacher,
                                                     "held-out score"),
                          "karras_error_vs_teacher": _score(args, model, baseline, held_teacher,
                                                            "held-out karras")}
    out["provenance"] = result.provenance
    return out


# -- handlers --------------------------------------------------------------------------------------

def run_teacher(args) -> int:
    model, source, pairs, _, guidance, grid = _setup(args)
    teacher = _teacher(args, model, pairs, guidance, grid)
    print(json.dumps({
        "model": args.model, "model_fingerprint": model.fingerprint(), "prompts": source,
        "samples": len(teacher.seeds), "guidance": guidance, "grid": grid.as_json(),
        "sigmas": teacher.sigmas.tolist(), "cache": teacher.path, "key": teacher.key,
        "from_cache": teacher.calls == 0, "model_calls_per_sample": teacher.calls,
        "latent_shape": list(teacher.x.shape[2:])}, indent=2))
    return 0


def run_oss(args) -> int:

    model, source, pairs, held, guidance, grid = _setup(args)
    teacher = _teacher(args, model, pairs, guidance, grid)
    live = 1 if not args.free_start else grid.steps
    total = len(pairs[1]) * (live + (args.budget - 1) * grid.steps)
    with _bar(args, total, "oss") as bar:
        result = oss.search(model, teacher, args.budget, free_start=args.free_start,
                        calibrate=args.calibrate, batch_size=args.batch_size,
                        progress=bar)
    summary = _summary(args, result, teacher, source, model, held, guidance, grid)
    print(json.dumps(summary, indent=2))
    return 0


def run_gits(args) -> int:

    model, source, pairs, held, guidance, grid = _setup(args)
    teacher = _teacher(args, model, pairs, guidance, grid)
    result = gits.search(teacher, args.budget, coeff=args.coeff)
    print(json.dumps(_summary(args, result, teacher, source, model, held, guidance, grid),
                     indent=2))
    return 0
