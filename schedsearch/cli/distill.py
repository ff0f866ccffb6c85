"""``schedsearch teacher``, ``schedsearch oss`` and ``schedsearch gits``: teacher trajectories and
the schedules distilled from them (SPEC §5). Each prints a JSON summary on stdout; the progress bar
goes to stderr."""

from __future__ import annotations

import json
import sys

# The usual CFG scale and prompt source of the built-in testbeds (as the study defaults use them).


def _common(p) -> None:
    p.add_argument("--model", default="digits",
                   help="digits (default), gmm, a hub id, a diffusers folder or a .safetensors "
                        "file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="SOURCE",
                     help="a prompt file (text, COCO captions JSON, CSV) or classes:K "
                          "(default: the testbed's classes)")
    src.add_argument("--classes", type=int, metavar="K", help="class labels 0..K-1 in turn")
    p.add_argument("--n", type=int, default=None,
                   help="number of (prompt, seed) pairs (default 64, or the number of --seeds)")
    p.add_argument("--seed", type=int, default=0,
                   help="prompt-set seed: pair i gets seed SEED*10^6 + i (default 0)")
    p.add_argument("--seeds", default=None,
                   help="explicit seeds, one per pair: comma-separated, ranges a-b allowed")
    p.add_argument("--teacher-steps", type=int, default=100, help="teacher steps N (default 100)")
    p.add_argument("--teacher-grid", choices=["uniform", "karras", "logsnr"], default="uniform",
                   help="teacher grid spacing: uniform in t (default), karras (rho 7), logsnr")
    p.add_argument("--teacher-end", default="zero",
                   help="data end of the grid: zero (default; σ_min then 0), sigma_min, or a σ > 0")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the model family's usual value)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default=None,
                   help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--cache-dir", default=None,
                   help="teacher cache folder (default $SCHEDSEARCH_CACHE/teacher or "
                        "~/.cache/schedsearch/teacher)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _distill_args(p) -> None:
    p.add_argument("--budget", type=int, required=True, metavar="M",
                   help="student steps M = model calls per image (must be < --teacher-steps)")
    p.add_argument("--solver", default="dpmpp_1s",
                   help="solver used to score the schedule against the teacher (default dpmpp_1s)")
    p.add_argument("--heldout", type=int, default=0, metavar="K",
                   help="also score on K held-out pairs (the next K of the prompt set; "
                        "costs a teacher on them)")


def register(sub) -> None:
    t = sub.add_parser(
        "teacher", help="compute (or load from cache) teacher trajectories",
        description="Fine first-order (DPM++1S) trajectories on the model's own grid for each "
                    "(prompt, seed) pair, cached on disk. OSS and GITS are distilled from them.",
        epilog="Example:  schedsearch teacher --model gmm --n 64 --teacher-steps 100")
    _common(t)
    t.set_defaults(handler=run_teacher)

    o = sub.add_parser(
        "oss", help="OSS: optimal stepsizes by dynamic programming against a teacher",
        description="Optimal Stepsize Search (Pei, Hu, Gu: \"Optimal Stepsize for Diffusion Sampling\"): per sample, a DP over the teacher grid "
                    "on the student's own states; one schedule per model by the per-position "
                    "median.",
        epilog="Example:  schedsearch oss --budget 5 --model gmm")
    _common(o)
    _distill_args(o)
    o.add_argument("--free-start", action="store_true",
                   help="let a path start below σ_max (the reference implementation's behaviour)")
    o.add_argument("--calibrate", action="store_true",
                   help="amplitude calibration during the search (5%%/95%% quantiles)")
    o.set_defaults(handler=run_oss)

    g = sub.add_parser(
        "gits", help="GITS: K-step shortest path on the teacher's one-jump cost matrix",
        description="Geometry-inspired time scheduling (Chen et al., ICML 2024): no model calls beyond the "
                    "teacher.",
        epilog="Example:  schedsearch gits --budget 5 --coeff 1.2 --model gmm")
    _common(g)
    _distill_args(g)
    g.add_argument("--coeff", type=float, default=1.2,
                   help="weight growth per step toward the data (default 1.2; > 1 favours small "
                        "steps at low noise)")
    g.set_defaults(handler=run_gits)


# -- helpers ---------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """'1,2,5-8' → [1, 2, 5, 6, 7, 8]."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1:])
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds must be integers or ranges a-b, got {part!r}") from None
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. --seeds 0-63")
    return seeds


def _grid(args):
    from ..teacher import TeacherGrid

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
    from .. import models, prompts as prompt_sets

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    heldout = getattr(args, "heldout", 0) or 0
    if heldout < 0:
        raise ValueError(f"--heldout must be >= 0, got {heldout}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    budget = getattr(args, "budget", None)
    if budget is not None and budget >= args.teacher_steps:
        raise ValueError(f"--budget {budget} must be smaller than --teacher-steps "
                         f"{args.teacher_steps}")
    grid = _grid(args)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    model = models.load(args.model, device=args.device, dtype=args.dtype)
    family = getattr(model, "family", "any")
    source = (f"classes:{args.classes}" if args.classes is not None
              else args.prompts or models.default_prompts(model))
    n = args.n if args.n is not None else (len(seeds) if seeds is not None else 64)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"--seeds gives {len(seeds)} seeds for --n {n} pairs; give one per pair")
    if seeds is not None and heldout:
        raise ValueError("--heldout takes its pairs from the prompt set's own seeds; "
                         "drop --seeds to use it")
    if heldout:
        main, rest = prompt_sets.split(source, n, heldout, args.seed)
    else:
        main, rest = prompt_sets.load(source, n, args.seed), None
    pairs = (list(main.prompts), seeds if seeds is not None else list(main.seeds))
    held = (list(rest.prompts), list(rest.seeds)) if rest is not None else None
    guidance = args.guidance if args.guidance is not None else models.default_guidance(family)
    return model, main.source, pairs, held, guidance, grid


def _bar(args, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=args.no_progress, file=sys.stderr,
                dynamic_ncols=True)


def _teacher(args, model, pairs, guidance, grid, desc="teacher"):
    from ..teacher import trajectories

    with _bar(args, len(pairs[1]) * grid.steps, desc) as bar:
        return trajectories(model, pairs[0], pairs[1], guidance=guidance, grid=grid,
                            cache=args.cache_dir, use_cache=not args.no_cache,
                            batch_size=args.batch_size, progress=bar)


def _score(args, model, sigmas, teacher, desc):
    from ..solvers import model_calls
    from ..teacher import error_vs_teacher

    with _bar(args, len(teacher.seeds), desc) as bar:
        err = error_vs_teacher(model, sigmas, teacher, solver=args.solver,
                               batch_size=args.batch_size, progress=bar)
    return {"mse": float(err.mean()), "rmse": float(err.mean().sqrt()), "samples": len(err),
            "calls_per_sample": model_calls(args.solver, sigmas)}


def _summary(args, result, teacher, source, model, held, guidance, grid) -> dict:
    from ..schedules import karras

    out = {"method": result.provenance["method"], "model": args.model,
           "model_fingerprint": model.fingerprint(), "budget": result.steps,
           "sigmas": result.sigmas.tolist(), "grid_indices": result.provenance["grid_indices"],
           "guidance": guidance, "prompts": source, "samples": len(teacher.seeds),
           "teacher": {"steps": teacher.steps, "grid": grid.as_json(), "cache": teacher.path,
                       "from_cache": teacher.calls == 0},
           "model_calls_per_sample": dict(result.provenance["calls_per_sample"],
                                          teacher_this_run=teacher.calls)}
    table = model.table
    baseline = karras(result.steps, table.sigma_min, table.sigma_max)
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
    from ..oss import search

    model, source, pairs, held, guidance, grid = _setup(args)
    teacher = _teacher(args, model, pairs, guidance, grid)
    live = 1 if not args.free_start else grid.steps
    total = len(pairs[1]) * (live + (args.budget - 1) * grid.steps)
    with _bar(args, total, "oss") as bar:
        result = search(model, teacher, args.budget, free_start=args.free_start,
                        calibrate=args.calibrate, batch_size=args.batch_size,
                        progress=bar)
    summary = _summary(args, result, teacher, source, model, held, guidance, grid)
    print(json.dumps(summary, indent=2))
    return 0


def run_gits(args) -> int:
    from ..gits import search

    model, source, pairs, held, guidance, grid = _setup(args)
    teacher = _teacher(args, model, pairs, guidance, grid)
    result = search(teacher, args.budget, coeff=args.coeff)
    print(json.dumps(_summary(args, result, teacher, source, model, held, guidance, grid),
                     indent=2))
    return 0
