"""``schedsearch schedule``: print a schedule as a table, JSON, or a ComfyUI sigma list."""

from __future__ import annotations

import json


def register(sub) -> None:
    from ..schedules import NAMES

    p = sub.add_parser(
        "schedule", help="print a schedule's σ list and model timesteps",
        description="Print a schedule. NAME is a family (karras, paper, ays, uniform, logsnr, "
                    "explicit) or one of the paper's presets (sd15-5, sd15-6, sd15-8, sdxl-6, "
                    "sdxl-8), which fix their own steps.",
        epilog="Examples:  schedsearch schedule sd15-5 --format json\n"
               "           schedsearch schedule paper --steps 8 --p1 7 --p2 1.2 --stop 3\n"
               "           schedsearch schedule ays --steps 5 --family sdxl --format comfy")
    p.add_argument("name", metavar="NAME", choices=NAMES, help="schedule family or preset")
    add_schedule_args(p)
    p.add_argument("--format", choices=["table", "json", "comfy"], default="table",
                   help="table (default), json ({sigmas, timesteps, ...}) or comfy (a comma-"
                        "separated list for ComfyUI's ManualSigmas / KJNodes CustomSigmas)")
    p.set_defaults(handler=run)


def add_schedule_args(p, steps_help: str = "number of steps (model calls of a 1-call solver)"
                      ) -> None:
    """The schedule flags, shared by every command that takes a schedule."""
    p.add_argument("--steps", type=int, help=steps_help)
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                   help="model family, picks the AYS table (default: sd15)")
    p.add_argument("--p1", type=float, default=7.0,
                   help="paper: exponent of the σ-ramp that picks the stopping level (default 7)")
    p.add_argument("--p2", type=float, default=1.2,
                   help="paper: exponent of the t-grid (default 1.2)")
    p.add_argument("--stop", type=float, default=None,
                   help="paper: stopping index, a number >= 1 (default 3; integers are the paper's)")
    p.add_argument("--M", type=int, default=None, help="paper: explicit ramp length (with --k)")
    p.add_argument("--k", type=int, default=None, help="paper: explicit ramp point (with --M)")
    p.add_argument("--final-denoise", action="store_true",
                   help="paper/presets: append σ = 0, one more model call x = D(x, σ_stop)")
    p.add_argument("--rho", type=float, default=7.0, help="karras: ρ (default 7)")
    p.add_argument("--sigma-min", type=float, default=None, help="karras/logsnr: lowest σ > 0")
    p.add_argument("--sigma-max", type=float, default=None, help="karras/logsnr: highest σ")
    p.add_argument("--sigmas", default=None,
                   help="explicit: comma-separated σ list, descending, optional final 0")
    p.add_argument("--noise-config", default=None, metavar="FILE",
                   help="a diffusers scheduler_config.json for a model whose noise table is not "
                        "Stable Diffusion's (default: the SD table)")


def spec_from_args(args, name: str | None = None) -> dict:
    """The schedule spec (see ``schedules.build``) that the flags describe; ``name`` overrides
    ``args.name`` (commands that take the schedule as ``--schedule NAME``)."""
    from ..schedules import PAPER_SETTINGS

    name = name or args.name
    if name in PAPER_SETTINGS:
        spec = {"name": name, "final_denoise": args.final_denoise}
        if args.steps is not None:
            spec["steps"] = args.steps
        return spec
    if name == "explicit":
        if not args.sigmas:
            raise ValueError("schedule 'explicit' needs --sigmas, e.g. --sigmas 14.6,3.0,0.5,0")
        try:
            values = [float(v) for v in args.sigmas.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--sigmas must be comma-separated numbers, got {args.sigmas!r}") from None
        return {"name": "explicit", "sigmas": values}
    if args.steps is None:
        raise ValueError(f"schedule {name!r} needs --steps N")
    spec = {"name": name, "steps": args.steps}
    if name == "paper":
        spec.update(p1=args.p1, p2=args.p2, final_denoise=args.final_denoise)
        if args.M is not None or args.k is not None:
            spec.update(M=args.M, k=args.k)
            if args.stop is not None:
                spec["stop"] = args.stop
        else:
            spec["stop"] = 3 if args.stop is None else args.stop
    elif name == "ays":
        spec["family"] = args.family
    elif name in ("karras", "logsnr"):
        if name == "karras":
            spec["rho"] = args.rho
        for key in ("sigma_min", "sigma_max"):
            if getattr(args, key) is not None:
                spec[key] = getattr(args, key)
    return spec


def run(args) -> int:
    from ..noise import SD
    from ..schedules import build, timesteps

    table = table_from_args(args) or SD
    spec = spec_from_args(args)
    sigmas = build(spec, table)
    ts = timesteps(sigmas, table)
    if args.format == "json":
        print(json.dumps({"schedule": spec, "sigmas": sigmas.tolist(), "timesteps": ts.tolist(),
                          "steps": len(sigmas) - 1, "ends_at_zero": float(sigmas[-1]) == 0.0},
                         indent=2))
    elif args.format == "comfy":
        print(", ".join(f"{s:.6f}" for s in sigmas.tolist()))
    else:
        print(f"{'step':>4}  {'sigma':>10}  {'timestep':>9}")
        for i, s in enumerate(sigmas.tolist()):
            t = f"{float(ts[i]):9.2f}" if i < len(ts) else f"{'(end)':>9}"
            print(f"{i:>4}  {s:10.5f}  {t}")
        end = "0 (clean)" if float(sigmas[-1]) == 0 else f"σ = {float(sigmas[-1]):.5f} (left for the VAE)"
        print(f"{len(sigmas) - 1} model calls with DPM++ solvers; ends at {end}")
    return 0


def table_from_args(args):
    """The noise table named by --noise-config, or None (use the model's own)."""
    from ..noise import NoiseTable

    if not getattr(args, "noise_config", None):
        return None
    with open(args.noise_config, encoding="utf-8") as f:
        return NoiseTable.from_config(json.load(f))
