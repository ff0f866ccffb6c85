"""``schedsearch score``: the FID proxy of one schedule, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_SCHEDULE, DEFAULT_STEPS = "karras", 8


def register(sub) -> None:
    from ..schedules import NAMES
    from .schedule import add_schedule_args

    p = sub.add_parser(
        "score", help="score one schedule with the FID proxy (FID, KID, time per stage)",
        description="Sample one image per prompt and seed with the given schedule and solver, "
                    "embed the images (clean-fid Inception, or the testbed's own features), and "
                    "compare them with reference statistics: FID at each growing subset, KID, "
                    "model calls, and where the time went. With no arguments it scores the "
                    f"digits testbed's default: DPM++2M with an {DEFAULT_STEPS}-step Karras "
                    "schedule, against the testbed's held-out digits.",
        epilog="Examples:\n"
               "  schedsearch score\n"
               "  schedsearch score --schedule paper --steps 5 --p1 5 --stop 2 --solver dpm++1s\n"
               "  schedsearch score --model gmm --schedule ays --steps 10 --n 512\n"
               "  schedsearch score --model sd-legacy/stable-diffusion-v1-5 --schedule sd15-8 \\\n"
               "      --prompts captions_val2014.json --n 1000 --ref-stats coco-val.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="digits (default), gmm, a hub id, a diffusers folder or a .safetensors "
                        "file")
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=NAMES, metavar="NAME",
                   help=f"schedule family or preset: {', '.join(NAMES)} "
                        f"(default {DEFAULT_SCHEDULE})")
    add_schedule_args(p, steps_help=f"number of steps (default {DEFAULT_STEPS} for families "
                                    "that need it)")
    p.add_argument("--preset", metavar="NAME|FILE",
                   help="score a preset (its σ list, solver, FreeU plan and guidance) instead of "
                        "--schedule/--solver/--freeu")
    p.add_argument("--solver", default="dpmpp_2m",
                   help="dpmpp_2m (default), dpmpp_1s, euler, heun (or DPM++2M, DPM++1S, DDIM)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: per model family)")
    p.add_argument("--freeu", metavar="B1,B2,S1,S2",
                   help="turn FreeU on with these values (UNet models only)")
    p.add_argument("--freeu-from", type=int, default=0, metavar="STEP",
                   help="first 0-based step with FreeU on (t_aug, default 0)")
    p.add_argument("--freeu-variant", choices=["diffusers", "original"], default="diffusers",
                   help="FreeU implementation (default diffusers; 'original' is the paper's)")
    p.add_argument("--prompts", help="prompt source: a text file, a COCO captions JSON, a CSV, or "
                                     "classes:K (default: the testbed's classes)")
    p.add_argument("--caption-column", default="caption",
                   help="CSV caption column (default caption)")
    p.add_argument("--n", type=int, default=256, help="number of images (default 256)")
    p.add_argument("--prompt-seed", type=int, default=0,
                   help="prompt-set seed; image i gets seed prompt_seed·10⁶ + i (default 0)")
    p.add_argument("--checkpoints", default="64,128",
                   help="comma-separated subset sizes with an intermediate FID (default 64,128)")
    p.add_argument("--ref-stats", metavar="FILE",
                   help="reference statistics (schedsearch refstats); the testbeds have their own")
    p.add_argument("--extractor", choices=["inception", "digits", "identity"],
                   help="feature space (default: digits / identity for the testbeds, else "
                        "inception)")
    p.add_argument("--inception", metavar="PATH",
                   help="clean-fid's inception-2015-12-05.pt (default: $SCHEDSEARCH_INCEPTION, "
                        "then /tmp/inception-2015-12-05.pt)")
    p.add_argument("--clip", metavar="DIR", help="a local CLIP folder: also report the CLIP score")
    p.add_argument("--kid-subsets", type=int, default=100,
                   help="KID subsets (default 100; 0: no KID)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--save-images", metavar="DIR", help="also write every image as a PNG")
    p.add_argument("--grid", metavar="PNG", help="write a grid of the first 64 images")
    p.set_defaults(handler=run)


def _freeu_plan(args, steps: int):
    if not args.freeu:
        return None
    from ..freeu import FreeU, FreeUPlan

    try:
        values = [float(v) for v in args.freeu.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--freeu takes four comma-separated numbers b1,b2,s1,s2, "
                         f"got {args.freeu!r}")
    return FreeUPlan.from_start(steps, args.freeu_from, FreeU(*values), args.freeu_variant)


def _checkpoints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--checkpoints takes comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from .. import __version__, models, prompts, schedules, solvers
    from ..metrics import features
    from ..metrics.score import Scorer, scoring_setup
    from ..models import default_prompts
    from .schedule import spec_from_args, table_from_args

    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (FID needs two images at least), got {args.n}")
    if args.steps is None and args.schedule not in schedules.PAPER_SETTINGS \
            and args.schedule != "explicit":
        args.steps = DEFAULT_STEPS
    model = models.load(args.model, device=args.device, dtype=args.dtype)
    if (args.grid or args.save_images) and len(model.latent_shape) != 3:
        raise ValueError(f"{args.model} makes vectors, not images: --grid and --save-images need "
                         "an image model")
    if args.preset:
        from ..presets import load as load_preset

        preset = load_preset(args.preset)
        spec = preset.schedule or {"name": "explicit", "sigmas": preset.sigmas.tolist()}
        sigmas, solver = preset.sigmas, preset.solver
        plan = preset.freeu if getattr(model, "unet", None) is not None else None
        if args.guidance is None:
            args.guidance = preset.guidance
    else:
        table = table_from_args(args) or model.table
        spec = spec_from_args(args, args.schedule)
        sigmas = schedules.build(spec, table)
        solver = solvers.canonical(args.solver)
        plan = _freeu_plan(args, len(sigmas) - 1)
    extractor, ref = scoring_setup(model, args)
    pset = prompts.load(args.prompts or default_prompts(model), args.n, args.prompt_seed,
                        caption_column=args.caption_column)
    clip = features.ClipScore(args.clip, device=model.device) if args.clip else None
    scorer = Scorer(model, extractor, ref, pset, guidance=args.guidance,
                    batch_size=args.batch_size, checkpoints=_checkpoints(args.checkpoints),
                    kid_subsets=args.kid_subsets, clip=clip)
    on_batch = None
    if args.save_images:
        from ..images import save_images

        def on_batch(start, images):
            save_images(images, args.save_images,
                        [f"{start + i:06d}.png" for i in range(images.shape[0])])
    res = scorer.score(sigmas, solver=solver, freeu=plan, keep_images=64 if args.grid else 0,
                       on_batch=on_batch, keep_features=False)
    if args.grid:
        from ..images import grid

        grid(res.images, scale=4 if res.images.shape[-1] <= 32 else 1).save(args.grid)
    out = res.as_dict()
    prov = scorer.provenance()
    out["provenance"] = {
        "model": args.model, "model_name": prov["model"], "fingerprint": prov["fingerprint"],
        "schedule": spec, "sigmas": [float(s) for s in sigmas], "solver": solver,
        "guidance": scorer.guidance,
        "freeu": plan.to_json() if plan is not None else None,
        "prompts": prov["prompts"], "extractor": prov["extractor"], "reference": prov["reference"],
        "checkpoints": prov["checkpoints"], "frechet": prov["frechet"], "kid": prov["kid"],
        "device": str(model.device), "schedsearch_version": __version__,
        "preset": args.preset,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0
