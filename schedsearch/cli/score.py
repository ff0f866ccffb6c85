"""``schedsearch score``: the FID proxy of one schedule (or preset), as JSON."""

from __future__ import annotations

import json
import os
import sys

from PIL import Image
from tqdm.auto import tqdm

from .. import prompts
from ..files import check_writable
from ..images import grid, save_images
from ..metrics import features
from ..metrics.score import Scorer, check_before_loading, scoring_setup
from ..models import check_prompts, prompt_source
from ..version import __version__
from . import options

DEFAULT_SCHEDULE, DEFAULT_STEPS = "karras", 8
DEFAULT_CHECKPOINTS = (64, 128)


def register(sub) -> None:
    p = options.command(
        sub, "score", help="score one schedule with the FID proxy (FID, KID, time per stage)",
        description="Sample one image per prompt and seed with the given schedule and solver "
                    "(or a preset), embed the images (clean-fid Inception, or the testbed's own "
                    "features), and compare them with reference statistics: FID at each growing "
                    "subset, KID, model calls, and where the time went. With no arguments it "
                    f"scores the digits testbed's default: DPM++2M with an {DEFAULT_STEPS}-step "
                    "Karras schedule, against the testbed's held-out digits.",
        examples=["schedsearch score",
                  "schedsearch score --schedule paper --steps 5 --p1 5 --stop 2 --solver dpm++1s",
                  "schedsearch score --preset sd15-5 --guidance 4",
                  "schedsearch score --model gmm --schedule ays --steps 10 --n 512",
                  "schedsearch score --model sd-legacy/stable-diffusion-v1-5 --preset sd15-8 \\\n"
                  "      --prompts captions_val2014.json --n 1000 --ref-stats coco-val.safetensors"])
    options.model(p)
    options.sd_model(p)
    options.sampling(p, default_schedule=DEFAULT_SCHEDULE, default_steps=DEFAULT_STEPS)
    options.prompts(p)
    p.add_argument("--n", type=int, default=256, help="number of images (default 256)")
    p.add_argument("--checkpoints", default=None,
                   help="comma-separated subset sizes with an intermediate FID, each in 2..N "
                        "(default: 64,128 where below --n; '' for none)")
    options.scoring(p)
    p.add_argument("--kid-subsets", type=int, default=100,
                   help="KID subsets (default 100; 0: no KID)")
    options.batch_size(p, 64)
    p.add_argument("--save-images", metavar="DIR", help="also write every image as a PNG")
    p.add_argument("--grid", metavar="PNG", help="write a grid of the first 64 images")
    options.progress(p)
    p.set_defaults(handler=run)


def _checkpoints(args) -> list[int]:
    """The image counts FID is also reported at, with --n and --kid-subsets checked."""
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (FID needs two images at least), got {args.n}")
    if args.kid_subsets < 0:
        raise ValueError(f"--kid-subsets must be >= 0 (0: no KID), got {args.kid_subsets}")
    if args.checkpoints is None:
        return [c for c in DEFAULT_CHECKPOINTS if c < args.n]
    # sizes the user asked for are checked, not dropped
    checkpoints = (options.int_list(args.checkpoints, "--checkpoints")
                   if args.checkpoints.strip() else [])
    bad = [c for c in checkpoints if not 2 <= c <= args.n]
    if bad:
        raise ValueError(f"--checkpoints must lie in 2..{args.n} (--n), got "
                         f"{', '.join(map(str, bad))}")
    return checkpoints


def _check_outputs(args) -> None:
    """--save-images and --grid are written during and after the scoring: a path that cannot
    take them fails here, before the model calls, not after them with the scores unprinted."""
    if args.grid and os.path.splitext(args.grid)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--grid {args.grid!r}: give an image file name, e.g. grid.png (PIL "
                         f"writes the format its extension names)")
    if args.grid and os.path.isdir(args.grid):
        raise ValueError(f"--grid {args.grid!r} is a folder; give the image file to write, e.g. "
                         f"{os.path.join(args.grid, 'grid.png')!r}")
    for flag, path, folder in (
            ("--save-images", args.save_images, args.save_images),
            ("--grid", args.grid, args.grid and os.path.dirname(os.path.abspath(args.grid)))):
        if path:
            try:
                check_writable(folder)
            except OSError as exc:
                raise ValueError(f"cannot write {flag} {path!r} ({exc.strerror} at "
                                 f"'{exc.filename}'); choose another path") from None


def run(args) -> int:
    checkpoints = _checkpoints(args)
    _check_outputs(args)
    # what needs no model first: a large pipeline takes minutes to load
    source = prompt_source(args.model, args.prompts)
    pset = prompts.load(source, args.n, args.prompt_seed,
                        caption_column=args.caption_column or "caption",
                        why=f"--n {args.n}, a prompt per image; lower it, or repeat lines in the "
                            "file")
    read = check_before_loading(args.model, extractor=args.extractor, inception=args.inception,
                                ref_stats=args.ref_stats, clip=args.clip)
    model = options.load_model(args)
    check_prompts(model, pset.prompts, source)
    if (args.grid or args.save_images) and len(model.latent_shape) != 3:
        raise ValueError(f"{args.model} makes vectors, not images: --grid and --save-images need "
                         "an image model")
    preset = options.preset_from_args(args, model)
    extractor, ref = scoring_setup(model, extractor=args.extractor, inception=args.inception,
                                   ref_stats=read or args.ref_stats, device=args.device)
    clip = features.ClipScore(args.clip, device=model.device) if args.clip else None
    scorer = Scorer(model, extractor, ref, pset, guidance=preset.guidance,
                    batch_size=args.batch_size, checkpoints=checkpoints,
                    kid_subsets=args.kid_subsets, clip=clip)
    # a real model's 256 images take minutes: a bar on stderr, stdout stays the JSON
    with tqdm(total=len(pset), desc=f"scoring {model.name}", unit="img",
              disable=args.no_progress or None, file=sys.stderr) as bar:

        def on_batch(start, images):
            if args.save_images:
                save_images(images, args.save_images,
                            [f"{start + i:06d}.png" for i in range(images.shape[0])])
            bar.update(images.shape[0])
        res = scorer.score(preset.sigmas, solver=preset.solver, freeu=preset.freeu,
                           keep_images=64 if args.grid else 0, on_batch=on_batch,
                           keep_features=False)
    if args.grid:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        grid(res.images, scale=4 if res.images.shape[-1] <= 32 else 1).save(args.grid)
    out = res.as_dict()
    out["provenance"] = {
        **scorer.provenance(), "model": args.model, "model_name": model.name,
        "schedule": preset.schedule, "sigmas": preset.sigmas.tolist(), "solver": preset.solver,
        "freeu": preset.freeu.to_json() if preset.freeu is not None else None,
        "preset": args.preset, "device": str(model.device), "schedsearch_version": __version__}
    json.dump(out, sys.stdout, indent=2)
    print()
    if out.get("kid") is None and args.kid_subsets > 0:   # a null with no reason reads as a bug
        which = f" {ref.path}" if ref.path else ""
        print(f"note: no KID: the reference statistics{which} hold mu and sigma only (made with "
              f"--no-features); remake them without it for KID", file=sys.stderr)
    return 0
