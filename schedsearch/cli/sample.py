"""``schedsearch sample``: sample images with one schedule, solver, guidance and FreeU plan, and
write them with their provenance (PNGs, a grid, samples.json)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

# Usual CFG scales per model family (the paper's 5.5 for SD1.x/2.x, 7.5 for SDXL); the testbeds are
# sharp at low guidance.
DEFAULT_STEPS = 20
DEFAULT_SEEDS = "0-3"
SD_ONLY = ("height", "width", "vae", "model_config", "eval_batch")


def register(sub) -> None:
    import argparse

    from .schedule import add_schedule_args

    p = sub.add_parser(
        "sample", help="sample images with a schedule and save them with their provenance",
        description="Sample one image per (prompt, seed) with a schedule, solver, CFG scale and "
                    "FreeU plan; write one PNG per image, grid.png (a scatter plot for the gmm "
                    "testbed) and samples.json (model fingerprint, σ list, solver, FreeU plan, "
                    "prompts, seeds, NFE, timings). With only --out it samples the 10 digit "
                    "classes of the built-in testbed with DPM++2M, Karras, 20 steps.",
        epilog="Examples:\n"
               "  schedsearch sample --out samples/\n"
               "  schedsearch sample --schedule sd15-5 --solver dpmpp_1s --freeu 1.1,1.1,0.9,0.2 "
               "--out s5/\n"
               "  schedsearch sample --model sd-legacy/stable-diffusion-v1-5 --schedule paper "
               "--steps 8 --p1 7 --p2 1.2 --stop 3 \\\n"
               "      --prompt 'a lighthouse at dusk' --seeds 0-7 --guidance 5.5 --out lighthouse/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="digits (default), gmm, a diffusers folder, a .safetensors checkpoint or "
                        "a hub id")
    p.add_argument("--schedule", metavar="NAME", default=None,
                   help="karras (default, with --steps 20), paper, ays, uniform, logsnr, explicit, "
                        "or a preset: sd15-5, sd15-6, sd15-8, sdxl-6, sdxl-8")
    add_schedule_args(p)
    # AYS picks its table from the model's family unless --family is given
    p.set_defaults(family=None)
    for action in p._actions:
        if action.dest == "family":
            action.help = "model family, picks the AYS table (default: the model's own)"
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help="a preset (schedsearch presets list, or a .json file): its σ list, solver, "
                        "FreeU plan and guidance; --guidance still overrides the guidance")
    p.add_argument("--solver", default=None,
                   help="dpmpp_2m (default), dpmpp_1s, euler or heun (DPM++2M / DPM++1S accepted)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default per family: digits 4, gmm 3, SD1.x/2.x 5.5, SDXL 7.5)")
    p.add_argument("--freeu", default=None, metavar="B1,B2,S1,S2",
                   help="FreeU values, e.g. 1.1,1.1,0.9,0.2, or a named default: "
                        "sd14, sd15, sd21, sdxl, paper (default: off)")
    p.add_argument("--t-aug", type=int, default=0,
                   help="FreeU is on for every step with 0-based index >= this (default 0)")
    p.add_argument("--freeu-variant", choices=["diffusers", "original"], default="diffusers",
                   help="diffusers' enable_freeu (default) or the FreeU authors' original patch")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--prompt", help="one text prompt, sampled once per seed")
    who.add_argument("--prompts", metavar="FILE",
                     help="a prompt file (one per line, COCO captions .json, .csv) or classes:K; "
                          "without --seeds each prompt keeps the prompt set's own seed")
    who.add_argument("--class", dest="classes", metavar="K",
                     help="class labels of a testbed: 3, 0-9 or 1,4,7 (default: all classes)")
    p.add_argument("--n", type=int, default=None, help="with --prompts: use the first N prompts")
    p.add_argument("--seeds", default=None,
                   help=f"seeds per prompt: 0-7, 0,3,5 or 0-3,10 (default {DEFAULT_SEEDS}; with "
                        f"--prompts: the prompt set's seeds)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    sd = p.add_argument_group("Stable Diffusion models")
    sd.add_argument("--height", type=int, help="image height (default: the model's native size)")
    sd.add_argument("--width", type=int, help="image width (default: the model's native size)")
    sd.add_argument("--vae", help="a replacement VAE (folder or hub id), e.g. an fp16-fix SDXL VAE")
    sd.add_argument("--model-config", metavar="FOLDER",
                    help="for a single .safetensors checkpoint: a diffusers folder of the same "
                         "architecture giving its configs (needed offline)")
    sd.add_argument("--eval-batch", type=int,
                    help="images per UNet call (default 1 on CPU, 8 on CUDA, 4 above 768²); a "
                         "fixed value keeps each image independent of the batch it is sampled in")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# -- parsing --------------------------------------------------------------------------------------

def parse_int_list(text: str, what: str) -> list[int]:
    """'0-7', '0,3,5', '0-3,10' → integers in the order given."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise ValueError(f"{what} must be integers or ranges a-b, e.g. 0-7 or 0,3,5; "
                             f"got {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{what}: the range {part!r} runs backwards")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def parse_freeu(text: str):
    from ..freeu import DEFAULTS, FreeU

    if text in DEFAULTS:
        return DEFAULTS[text]
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--freeu takes four numbers b1,b2,s1,s2 (e.g. 1.1,1.1,0.9,0.2) or one of "
                         f"{', '.join(DEFAULTS)}; got {text!r}")
    return FreeU(*values)


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s[:limit].strip("-") or "empty"


def _jobs(args, model):
    """(prompts, seeds, columns, source): one entry per image, in grid order (a row per prompt
    and a column per seed; columns None when every prompt has its own seed)."""
    from .. import prompts as prompt_sets

    seeds = parse_int_list(args.seeds, "--seeds") if args.seeds else None
    testbed = model.family in ("digits", "gmm")
    if args.n is not None and not args.prompts:
        raise ValueError("--n applies to --prompts")
    if args.prompts:
        pset = prompt_sets.load(args.prompts, args.n)
        if seeds is None:
            return list(pset.prompts), list(pset.seeds), None, pset.as_json()
        texts = list(pset.prompts)
        source = pset.as_json()
    elif args.prompt is not None:
        texts, source = [args.prompt], {"source": "--prompt"}
    else:
        if not testbed:
            raise ValueError(f"{model.name} is a text-to-image model: give --prompt TEXT or "
                             f"--prompts FILE (--class is for the digits and gmm testbeds)")
        k = getattr(model, "num_classes", 10)
        texts = parse_int_list(args.classes, "--class") if args.classes else list(range(k))
        for c in texts:
            if not 0 <= c < k:
                raise ValueError(f"--class: {model.name} has classes 0..{k - 1}, got {c}")
        source = {"source": f"classes {texts[0]}..{texts[-1]}" if args.classes is None
                  else f"--class {args.classes}"}
    if args.classes and not testbed:
        raise ValueError("--class is for the digits and gmm testbeds; give text prompts instead")
    seeds = seeds or parse_int_list(DEFAULT_SEEDS, "--seeds")
    prompts = [t for t in texts for _ in seeds]
    return prompts, [s for _ in texts for s in seeds], len(seeds), source


# -- outputs --------------------------------------------------------------------------------------

def _image_name(i: int, prompt, seed: int) -> str:
    what = f"class{prompt}" if isinstance(prompt, int) else _slug(prompt)
    return f"{i:04d}_{what}_seed{seed}.png"


def _scatter(model, vectors, prompts, path) -> None:
    """First two dimensions of the samples over exact draws from the data distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 6))
    labels = np.asarray([int(p) for p in prompts])
    k = int(getattr(model, "num_classes", labels.max() + 1))
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("tab10").colors[:k]) if k <= 10 else "viridis"
    style = dict(cmap=cmap, vmin=-0.5, vmax=k - 0.5)
    if hasattr(model, "sample_data"):
        ref_ids = np.repeat(labels, max(1, 400 // len(labels)))
        ref = model.sample_data(list(ref_ids), seed=12345).numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=8, c=ref_ids, alpha=0.25, linewidths=0, **style)
    v = vectors.numpy()
    sc = ax.scatter(v[:, 0], v[:, 1], s=22, c=labels, edgecolors="k", linewidths=0.5, **style)
    ax.text(0.01, 0.01, "faint: exact draws from the data, same classes; outlined: samples",
            transform=ax.transAxes, fontsize=8, va="bottom")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(f"{model.name}: samples by class (first two dimensions)")
    fig.colorbar(sc, ax=ax, label="class", ticks=range(k))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _model_facts(model, spec: str) -> dict:
    facts = {"spec": spec, "name": model.name, "family": model.family,
             "fingerprint": model.fingerprint(), "device": str(model.device),
             "dtype": str(model.dtype), "latent_shape": list(model.latent_shape),
             "noise_table": model.table.fingerprint()}
    if hasattr(model, "describe"):
        facts.update(model.describe())
    return facts


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from .. import __version__, models, schedules, solvers
    from ..freeu import FreeUPlan
    from ..images import grid, save_images
    from ..sampler import sample
    from . import UserError
    from .schedule import spec_from_args, table_from_args

    t_start = time.perf_counter()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    preset = None
    if args.preset:
        from ..presets import load as load_preset

        clash = [f for f, v in (("--schedule", args.schedule), ("--solver", args.solver),
                                ("--freeu", args.freeu)) if v]
        if clash:
            raise UserError(f"--preset sets the schedule, solver and FreeU plan; drop {', '.join(clash)}")
        preset = load_preset(args.preset)
    solver = solvers.canonical(preset.solver if preset else (args.solver or "dpmpp_2m"))
    setting = parse_freeu(args.freeu) if args.freeu else None
    if args.t_aug < 0:
        raise UserError(f"--t-aug must be >= 0, got {args.t_aug}")

    kwargs = {k: getattr(args, k) for k in SD_ONLY if getattr(args, k) is not None}
    if args.model in models.BUILTIN and kwargs:
        flags = ", ".join("--" + k.replace("_", "-") for k in kwargs)
        raise UserError(f"{flags}: for Stable Diffusion models only, not the {args.model} testbed")
    if "model_config" in kwargs:
        kwargs["config"] = kwargs.pop("model_config")
    model = models.load(args.model, device=args.device, dtype=args.dtype, **kwargs)
    t_loaded = time.perf_counter()

    if preset is not None:
        spec = preset.schedule or {"name": "explicit", "sigmas": preset.sigmas.tolist()}
        sigmas, table, steps = preset.sigmas, model.table, len(preset.sigmas) - 1
        name = f"preset {preset.name}"
        plan = preset.freeu if preset.freeu is not None else FreeUPlan.off(steps)
        if plan.active and getattr(model, "unet", None) is None:
            print(f"note: {model.name} has no UNet; the preset's FreeU plan is skipped",
                  file=sys.stderr)
            plan = FreeUPlan.off(steps)
        default_g = preset.guidance if preset.guidance is not None else models.default_guidance(model)
    else:
        name = args.schedule or "karras"
        if name not in schedules.NAMES:
            raise UserError(f"unknown schedule {name!r}; choose from {', '.join(schedules.NAMES)}")
        if args.schedule is None and args.steps is None:
            args.steps = DEFAULT_STEPS
        if args.family is None:
            args.family = "sdxl" if model.family == "sdxl" else "sd15"
        spec = spec_from_args(args, name)
        table = table_from_args(args) or model.table
        sigmas = schedules.build(spec, table)
        steps = len(sigmas) - 1
        plan = (FreeUPlan.from_start(steps, args.t_aug, setting, args.freeu_variant) if setting
                else FreeUPlan.off(steps))
        default_g = models.default_guidance(model)
    guidance = args.guidance if args.guidance is not None else default_g

    prompts, seeds, columns, source = _jobs(args, model)
    os.makedirs(args.out, exist_ok=True)
    with tqdm(total=len(prompts), desc=f"sampling {model.name}", unit="img",
              disable=args.no_progress, file=sys.stderr) as bar:
        out = sample(model, sigmas, prompts, seeds, solver=solver, guidance=guidance,
                     freeu=plan, batch_size=args.batch_size, progress=bar)
    t_sampled = time.perf_counter()

    images = out.images
    files: list[str] = []
    if images.ndim == 4:
        names = [_image_name(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        save_images(images, args.out, names)
        files = names
        side = max(images.shape[-2:])
        scale = max(1, math.ceil(128 / side))   # 8×8 digits → 128 px cells, legible in a viewer
        grid(images, nrow=columns, pad=1, scale=scale).save(
            os.path.join(args.out, "grid.png"))
        figure = "grid.png"
    else:
        import numpy as np

        np.save(os.path.join(args.out, "samples.npy"), images.numpy())
        _scatter(model, images, prompts, os.path.join(args.out, "scatter.png"))
        figure = "scatter.png"
    t_written = time.perf_counter()

    from importlib.metadata import PackageNotFoundError, version

    def _ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    record = {
        "schedsearch_version": __version__,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("handler", "command")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": _model_facts(model, args.model),
        "schedule": {"spec": spec, "sigmas": [float(s) for s in sigmas],
                     "timesteps": [float(t) for t in schedules.timesteps(sigmas, table)],
                     "steps": steps, "ends_at_zero": float(sigmas[-1]) == 0.0},
        "preset": preset.to_json() if preset is not None else None,
        "solver": solver,
        "guidance": guidance,
        "freeu": plan.to_json(),
        "nfe": out.nfe,
        "prompts": source,
        "seeds": seeds,
        "images": [{"index": i, "prompt": p, "seed": s, **({"file": files[i]} if files else {})}
                   for i, (p, s) in enumerate(zip(prompts, seeds))],
        "figure": figure,
        "batch_size": args.batch_size,
        "timings": {"load_s": t_loaded - t_start, "sample_s": t_sampled - t_loaded,
                    "model_s": out.seconds.get("model"), "solver_s": out.seconds.get("solver"),
                    "decode_s": out.seconds.get("decode"), "write_s": t_written - t_sampled,
                    "per_image_s": (t_sampled - t_loaded) / len(prompts)},
        "versions": {"torch": torch.__version__, "diffusers": _ver("diffusers"),
                     "transformers": _ver("transformers")},
    }
    with open(os.path.join(args.out, "samples.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    print(f"{len(prompts)} images, {out.nfe} model calls each ({solver}, {name}, guidance "
          f"{guidance:g}, FreeU {plan.describe()}) → {args.out}/ ({figure}, samples.json)")
    return 0
