"""``schedsearch schedule``: print a schedule as a table, JSON, or a ComfyUI sigma list."""

from __future__ import annotations

import json

from ..comfy import flow_t_string, sigma_string
from ..noise import SD
from ..schedules import FLOW_NAMES, NAMES, build, timesteps
from . import options


def register(sub) -> None:

    p = options.command(
        sub, "schedule", help="print a schedule's σ list and model timesteps",
        description="Print a schedule. NAME is a family (karras, paper, ays, uniform, logsnr, "
                    "explicit, knots; flow and optimalsteps on flow models) or one of the "
                    "paper's presets (sd15-5, sd15-6, sd15-8, sdxl-6, sdxl-8), which fix their "
                    "own steps. The SD noise table unless --noise-config names another (an "
                    "SD3/FLUX FlowMatch scheduler config: σ lists from ∞, docs/flow.md).",
        examples=["schedsearch schedule sd15-5 --format json",
                  "schedsearch schedule paper --steps 8 --p1 7 --p2 1.2 --stop 3",
                  "schedsearch schedule ays --steps 5 --family sdxl --format comfy",
                  "schedsearch schedule flow --steps 8 --noise-config "
                  "sd3/scheduler/scheduler_config.json --format comfy"])
    p.add_argument("name", metavar="NAME", nargs="?", choices=NAMES,
                   help="schedule family or preset (optional with --sigmas or --fractions, which "
                        "name their own)")
    options.schedule(p)
    p.add_argument("--format", choices=["table", "json", "comfy"], default="table",
                   help="table (default), json ({sigmas, timesteps, ...}) or comfy (a comma-"
                        "separated list for ComfyUI's ManualSigmas / KJNodes CustomSigmas)")
    p.set_defaults(handler=run)


def run(args) -> int:

    # --sigmas or --fractions alone name their schedule, as they do for sample and score
    name = (args.name or ("explicit" if args.sigmas else None)
            or ("knots" if args.fractions else None))
    if name is None:
        raise ValueError("give a schedule NAME (e.g. karras --steps 5), or a σ list with --sigmas")
    table = options.noise_table(args) or SD
    if name in FLOW_NAMES and table.kind != "flow":   # this command has no --model
        raise ValueError(f"schedule {name!r} is for flow-matching models: give one's scheduler "
                         f"config with --noise-config FILE (e.g. sd3/scheduler/"
                         f"scheduler_config.json of a diffusers folder; docs/flow.md)")
    spec = options.schedule_spec(args, name)
    sigmas = build(spec, table)
    ts = timesteps(sigmas, table)
    if args.format == "json":
        print(json.dumps({"schedule": spec, "sigmas": sigmas.tolist(), "timesteps": ts.tolist(),
                          "steps": len(sigmas) - 1, "ends_at_zero": float(sigmas[-1]) == 0.0},
                         indent=2))
    elif args.format == "comfy":   # ComfyUI's "sigma" of a flow model is its time t
        print(flow_t_string(sigmas) if table.kind == "flow"
              else sigma_string(sigmas))
    else:
        print(f"{'step':>4}  {'sigma':>10}  {'timestep':>9}")
        for i, s in enumerate(sigmas.tolist()):
            t = f"{float(ts[i]):9.2f}" if i < len(ts) else f"{'(end)':>9}"
            print(f"{i:>4}  {s:10.5f}  {t}")
        end = "0 (clean)" if float(sigmas[-1]) == 0 else f"σ = {float(sigmas[-1]):.5f} (left for the VAE)"
        calls = len(sigmas) - 1
        print(f"{calls} model call{'s' if calls != 1 else ''} with DPM++ solvers; ends at {end}")
    return 0
