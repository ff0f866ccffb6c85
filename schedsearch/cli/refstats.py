"""``schedsearch refstats``: reference statistics for the FID proxy, from images or a testbed."""

from __future__ import annotations

import json
import os
import sys

from tqdm.auto import tqdm

from .. import models
from ..files import check_writable
from ..metrics import features
from ..metrics.fid import folder_features, list_images
from ..metrics.refstats import RefStats, default_refstats
from ..prompts import MAX_SEED
from . import options


def register(sub) -> None:
    p = options.command(
        sub, "refstats", help="make reference statistics (mu, sigma, features) for FID/KID",
        description="Embed real images and store their mean, covariance and raw features (for "
                    "KID) with their provenance in a safetensors file, for `schedsearch score "
                    "--ref-stats` and `schedsearch run --ref-stats`. Images are read and resized "
                    "exactly as clean-fid does. The built-in testbeds build their own statistics "
                    "on first use; --testbed builds (or shows) them explicitly.",
        examples=["schedsearch refstats --images coco-val-512/ --out coco-val-512.safetensors",
                  "schedsearch refstats --testbed digits",
                  "schedsearch refstats --testbed gmm --n 20000 --out gmm-ref.safetensors"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR",
                     help="a folder of real images (searched recursively)")
    src.add_argument("--testbed", choices=["digits", "gmm"],
                     help="a built-in testbed's reference data (digits: the held-out split; gmm: "
                          "exact samples)")
    p.add_argument("--out", metavar="FILE",
                   help="output .safetensors file (required with --images; with --testbed the "
                        "statistics also go to the cache)")
    options.extractor(p)
    p.add_argument("--n", type=int, help="use the first N images (files in sorted order) / N "
                                         "exact gmm samples (default: all / 10000)")
    p.add_argument("--data-seed", type=int,
                   help="gmm: the seed of the exact reference samples (default 12345)")
    p.add_argument("--rebuild", action="store_true", help="--testbed: ignore the cached copy")
    p.add_argument("--no-features", action="store_true",
                   help="store only mu and sigma (smaller file; KID then unavailable)")
    options.batch_size(p, None)
    p.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    options.progress(p)
    p.set_defaults(handler=run)


def _check_flags(args) -> None:
    """A flag that does nothing for this source is one line, not silently dropped (a digits
    --data-seed used to build the same statistics, stamped with that seed)."""
    if args.images and args.rebuild:
        raise ValueError("--rebuild applies to --testbed (its cached copy); --images always "
                         "reads the folder")
    if args.data_seed is not None and not 0 <= args.data_seed < MAX_SEED:
        raise ValueError(f"--data-seed must be in [0, 2**64), got {args.data_seed}")
    if args.data_seed is not None and args.testbed != "gmm":
        raise ValueError("--data-seed applies to --testbed gmm (its exact samples); "
                         + ("a folder's images are what they are" if args.images else
                            "the digits reference is its fixed held-out split"))
    if args.testbed and args.no_features and not args.out:
        raise ValueError("--no-features applies to the --out file (the cached copy keeps its "
                         "features, for KID); add --out FILE")
    if args.inception and (args.extractor or ("inception" if args.images else None)) \
            != "inception":
        what = f"the {args.testbed} testbed's statistics" if args.testbed else "these statistics"
        raise ValueError(f"--inception is used only with --extractor inception; {what} use "
                         f"{'the ' + args.extractor if args.extractor else 'its own'} extractor")


# clean-fid's own statistics use 50 000 images; a million is already far past what FID needs
MAX_IMAGES = 1_000_000


def run(args) -> int:
    _check_flags(args)
    if args.n is not None and not 2 <= args.n <= MAX_IMAGES:
        raise ValueError(f"--n must be in [2, {MAX_IMAGES}], got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:   # 0 used to mean the default
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out:   # before the features whose statistics would go there
        if args.out.endswith(("/", os.sep)) or os.path.basename(args.out) in ("", ".", ".."):
            # a name ending in a separator means a folder; it used to be written as a file
            raise ValueError(f"--out {args.out!r}: --out must name a file (e.g. "
                             f"{os.path.join(args.out, 'ref.safetensors')!r}), not a folder")
        if os.path.isdir(args.out):
            raise IsADirectoryError(21, "is a folder; --out names the statistics file", args.out)
        check_writable(os.path.dirname(os.path.abspath(args.out)))
    device = str(models.resolve_device(args.device))
    if args.images:
        if not args.out:
            raise ValueError("--images needs --out FILE (where to write the statistics)")
        found = list_images(args.images)   # a mistyped folder first, before any weights
        n = len(found) if args.n is None else args.n
        if n > len(found):
            raise ValueError(f"--n {n}: {args.images!r} holds only {len(found)} images")
        if n < 2:   # before the extractor loads and the image is embedded for nothing
            raise ValueError(f"{args.images!r} holds one image ({found[0]}); FID needs at least 2 "
                             "images (thousands for a useful reference)")
        ext = features.build(args.extractor or "inception", device=device,
                             inception_path=args.inception, batch_size=args.batch_size)
        # thousands of images through Inception on a CPU take a while
        with tqdm(total=n, desc="embedding images", unit="img",
                  disable=args.no_progress or None, file=sys.stderr) as bar:
            feats = folder_features(args.images, ext, args.batch_size, num=n, progress=bar)
        ref = RefStats.from_features(feats, extractor=ext, source=os.path.abspath(args.images),
                                     keep_features=not args.no_features)
        ref.save(args.out)
        paths = [args.out]
    else:
        model = models.load(args.testbed, device=device)
        ext = features.build(args.extractor, model=model, device=device,
                             inception_path=args.inception, batch_size=args.batch_size)
        ref = default_refstats(model, ext, n=args.n, seed=args.data_seed, device=device,
                               rebuild=args.rebuild)
        paths = [ref.path]
        if args.out:
            if args.no_features:
                ref = RefStats(ref.mu, ref.sigma, None, dict(ref.meta))
            ref.save(args.out)
            paths.append(args.out)
    summary = {"written": paths, **ref.provenance()}
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0
