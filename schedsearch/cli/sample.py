"""``schedsearch sample``: sample images with one schedule, solver, guidance and FreeU plan (or a
preset), and write them with their provenance (PNGs, a grid, samples.json)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from tqdm import tqdm

from .. import files, models, prompts as prompt_sets, schedules
from ..freeu import FreeUPlan
from ..images import grid, save_images
from ..sampler import check_seeds, sample
from ..version import __version__
from . import options

DEFAULT_STEPS = 20
DEFAULT_SEEDS = "0-3"


def register(sub) -> None:
    p = options.command(
        sub, "sample", help="sample images with a schedule and save them with their provenance",
        description="Sample one image per (prompt, seed) with a schedule, solver, CFG scale and "
                    "FreeU plan — or a preset — and write one PNG per image, grid.png (a scatter "
                    "plot for the gmm testbed) and samples.json (model fingerprint, σ list, "
                    "solver, FreeU plan, prompts, seeds, NFE, timings). With only --out it "
                    "samples the 10 digit classes of the built-in testbed with DPM++2M, Karras, "
                    f"{DEFAULT_STEPS} steps.",
        examples=["schedsearch sample --out samples/",
                  "schedsearch sample --preset sd15-5 --out s5/",
                  "schedsearch sample --schedule sd15-5 --solver dpmpp_1s --freeu 1.1,1.1,0.9,0.2 "
                  "--out s5/",
                  "schedsearch sample --model sd-legacy/stable-diffusion-v1-5 --schedule paper "
                  "--steps 8 --p1 7 --p2 1.2 --stop 3 \\\n"
                  "      --prompt 'a lighthouse at dusk' --seeds 0-7 --guidance 5.5 --out lighthouse/"])
    options.model(p)
    options.sampling(p, default_schedule="karras", default_steps=DEFAULT_STEPS)
    p.add_argument("--prompt", action="append",
                   help="a prompt (text, or a class label of a testbed), sampled once per seed; "
                        "repeat it for more prompts (a row each in the grid)")
    options.prompts(p, default_seed=None)
    p.add_argument("--n", type=int, default=None, help="with --prompts: use the first N prompts")
    p.add_argument("--seeds", default=None,
                   help=f"seeds per prompt: 0-7, 0,3,5 or 0-3,10 (default {DEFAULT_SEEDS}; with "
                        f"--prompts: the prompt set's seeds)")
    options.batch_size(p, 16)
    options.sd_model(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    options.progress(p)
    p.set_defaults(handler=run)


# -- parsing --------------------------------------------------------------------------------------

def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s[:limit].strip("-") or "empty"


def _jobs(args):
    """(prompts, seeds, columns, source): one entry per image, in grid order (a row per prompt
    and a column per seed; columns None when every prompt has its own seed)."""

    if args.prompt is not None and args.prompts:
        raise ValueError("give --prompt TEXT or --prompts SOURCE, not both")
    if args.n is not None and not args.prompts:
        raise ValueError("--n applies to --prompts (e.g. --prompts classes:10 --n 40: 40 images, "
                         "each its own seed); without --prompts every class or prompt is drawn "
                         f"once per seed of --seeds (default {DEFAULT_SEEDS})")
    # '' is a mistake (an unset shell variable), not a request for the default seeds
    # a seed given twice would draw the same images twice, under two names
    if args.prompt_seed is not None and not args.prompts:
        raise ValueError("--prompt-seed applies to --prompts (it picks the prompt set's seeds, "
                         "and a COCO file's captions); without it every prompt is drawn once "
                         f"per seed of --seeds (default {DEFAULT_SEEDS})")
    if args.caption_column is not None and not args.prompts:
        raise ValueError("--caption-column applies to a CSV --prompts file (it names the column "
                         "holding the prompts)")
    seeds = (options.int_list(args.seeds, "--seeds", unique="seed") if args.seeds is not None
             else None)
    check_seeds(seeds or ())
    if args.prompt is not None:
        texts, source = list(args.prompt), {"source": "--prompt"}
    else:
        pset = prompt_sets.load(models.prompt_source(args.model, args.prompts), args.n,
                                args.prompt_seed or 0, caption_column=args.caption_column
                                or "caption")
        if seeds is None and args.prompts:
            return list(pset.prompts), list(pset.seeds), None, pset.as_json()
        # the set's prompts with the seeds of --seeds: its own seeds did not run
        texts = list(pset.prompts)
        source = {**{k: v for k, v in pset.as_json().items() if k != "seeds"},
                  "seeds_from": "--seeds"}
    seeds = seeds or options.int_list(DEFAULT_SEEDS, "--seeds")
    prompts = [t for t in texts for _ in seeds]
    return prompts, [s for _ in texts for s in seeds], len(seeds), source


# -- outputs --------------------------------------------------------------------------------------

def _image_name(i: int, prompt, seed: int) -> str:
    what = f"class{prompt}" if isinstance(prompt, int) else _slug(prompt)
    return f"{i:04d}_{what}_seed{seed}.png"


def _scatter(model, vectors, prompts, path) -> None:
    """First two dimensions of the samples over exact draws from the data distribution (the gmm
    testbed, whose samples are vectors)."""
    import matplotlib  # matplotlib: heavy, only for the gmm scatter

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    k = model.num_classes
    # '' or None is unconditional: the whole mixture, which sample_data draws as class id k
    labels = np.asarray([k if p in ("", None) else int(p) for p in prompts])
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("tab10").colors[:k]) if k <= 10 else "viridis"
    style = dict(cmap=cmap, vmin=-0.5, vmax=k - 0.5)
    ref_ids = np.repeat(labels, max(1, 400 // len(labels)))
    ref = model.sample_data(list(ref_ids), seed=12345).numpy()
    v = vectors.numpy()
    for points, ids, size, alpha, edge in ((ref, ref_ids, 8, 0.25, None), (v, labels, 22, 1, "k")):
        cond = ids < k
        sc = ax.scatter(points[cond, 0], points[cond, 1], s=size, c=ids[cond], alpha=alpha,
                        edgecolors=edge, linewidths=0.5 if edge else 0, **style)
        if not cond.all():   # unconditional ones in grey
            ax.scatter(points[~cond, 0], points[~cond, 1], s=size, color="0.45", alpha=alpha,
                       edgecolors=edge, linewidths=0.5 if edge else 0)
    ax.text(0.01, 0.01, "faint: exact draws from the data, same classes; outlined: samples"
            + ("\ngrey: unconditional (the whole mixture)" if (labels == k).any() else ""),
            transform=ax.transAxes, fontsize=8, va="bottom")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(f"{model.name}: samples by class (first two dimensions)")
    fig.colorbar(sc, ax=ax, label="class", ticks=range(k))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(images, prompts, seeds, columns, model, out: str) -> tuple[str, list[str]]:
    """PNGs and a grid (a scatter plot and samples.npy for vectors); returns the figure's name
    and the image files."""

    if images.ndim == 4:
        names = [_image_name(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        save_images(images, out, names)
        scale = max(1, math.ceil(128 / max(images.shape[-2:])))   # 8×8 digits → 128 px cells
        grid(images, nrow=columns, pad=1, scale=scale).save(os.path.join(out, "grid.png"))
        return "grid.png", names

    np.save(os.path.join(out, "samples.npy"), images.numpy())
    _scatter(model, images, prompts, os.path.join(out, "scatter.png"))
    return "scatter.png", []


def _versions() -> dict:

    out = {}
    for pkg in ("torch", "diffusers", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(args) -> int:

    t_start = time.perf_counter()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    files.check_writable(args.out)   # before the sampling whose images would go there
    for name in ("samples.json", "grid.png", "scatter.png", "samples.npy"):
        if os.path.isdir(os.path.join(args.out, name)):   # found only after the sampling
            raise ValueError(f"{os.path.join(args.out, name)} is a folder where sample writes "
                             f"its {name}: move it, or choose another --out")
    if args.prompt is None and not args.prompts and args.model not in models.DEFAULT_PROMPTS:
        # said before a pipeline takes minutes to load (a testbed's spec is its family)
        raise ValueError(f"{args.model} is a text-to-image model: give --prompt TEXT or "
                         f"--prompts FILE")
    prompts, seeds, columns, source = _jobs(args)   # a bad file or seed list: before the load
    model = options.load_model(args)
    t_loaded = time.perf_counter()
    preset = options.preset_from_args(args, model)
    models.check_prompts(model, prompts, args.prompts or "--prompt")
    with tqdm(total=len(prompts), desc=f"sampling {model.name}", unit="img",
              disable=args.no_progress or None, file=sys.stderr) as bar:
        out = sample(model, preset.sigmas, prompts, seeds, solver=preset.solver,
                     guidance=preset.guidance, freeu=preset.freeu, batch_size=args.batch_size,
                     progress=bar)
    t_sampled = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    figure, names = _write(out.images, prompts, seeds, columns, model, args.out)
    t_written = time.perf_counter()
    steps = len(preset.sigmas) - 1
    record = {
        "schedsearch_version": __version__,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("handler", "command")},
        "created": files.utc_now(),
        "model": {"spec": args.model, **model.describe()},
        "preset": preset.to_json(),
        "schedule": {"spec": preset.schedule, "sigmas": preset.sigmas.tolist(), "steps": steps,
                     "timesteps": schedules.timesteps(preset.sigmas, model.table).tolist(),
                     "ends_at_zero": float(preset.sigmas[-1]) == 0.0},
        "solver": preset.solver, "guidance": preset.guidance,
        "freeu": (preset.freeu or FreeUPlan.off(steps)).to_json(),
        "nfe": out.nfe, "prompts": source, "seeds": seeds, "figure": figure,
        "images": [{"index": i, "prompt": p, "seed": s, **({"file": names[i]} if names else {})}
                   for i, (p, s) in enumerate(zip(prompts, seeds))],
        "batch_size": args.batch_size,
        "timings": {"load_s": t_loaded - t_start, "sample_s": t_sampled - t_loaded,
                    "write_s": t_written - t_sampled,
                    "per_image_s": (t_sampled - t_loaded) / len(prompts),
                    **{f"{k}_s": v for k, v in out.seconds.items()}},
        "versions": _versions(),
    }
    files.atomic_write(os.path.join(args.out, "samples.json"),
                       json.dumps(record, indent=2, ensure_ascii=False))
    print(f"{len(prompts)} images, {out.nfe} model calls each ({preset.solver}, {preset.name}, "
          f"guidance {preset.guidance:g}, FreeU "
          f"{preset.freeu_text()}) → {args.out}/ ({figure}, "
          f"samples.json)")
    return 0
