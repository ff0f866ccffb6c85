"""Measure the built-in digits testbeds (``digits``, or its flow twin ``digits-flow``) against
their quality bar.

    python analysis/digits_quality.py [--model digits|digits-flow] [--guidance 2]
                                      [--sweep 1 1.5 3 4] [--threads N]

The bar: the classifier recognises ≥ 97% of the held-out digits; 1,000 samples (100 per class,
fixed seeds) from 50-step DPM++2M at the chosen guidance are recognised as the requested class
≥ 90% of the time, and their Fréchet distance to the held-out digits in the classifier's feature
space is within 2× the train-vs-held-out distance. The schedule is a Karras one for ``digits`` and
the model's own (uniform in t from σ = ∞) for ``digits-flow``. Also times one model call.

Writes analysis/results/<model>_quality.json and analysis/results/<model>_samples.png
(digits_quality.json and digits_samples.png for ``digits``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from schedsearch import schedules
from schedsearch.images import grid
from schedsearch.models.digits import NUM_CLASSES, digits_data, load_classifier, load_digits, to_unit
from schedsearch.models.digits_flow import load_digits_flow
from schedsearch.sampler import sample

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY_BAR, RECOGNITION_BAR, FRECHET_RATIO_BAR = 0.97, 0.90, 2.0


def heldout_accuracy(classifier) -> float:
    images, labels = digits_data("heldout")
    return float((classifier.predict(to_unit(images)) == labels).float().mean())


def class_prompts(per_class: int) -> tuple[list[int], list[int]]:
    """Class i % 10 for image i, seed i: every class gets ``per_class`` fixed seeds."""
    n = per_class * NUM_CLASSES
    return [i % NUM_CLASSES for i in range(n)], list(range(n))


def frechet(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    from cleanfid.fid import frechet_distance

    a, b = features_a.double().numpy(), features_b.double().numpy()
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                  b.mean(0), np.cov(b, rowvar=False)))


def schedule(model, steps: int) -> tuple[torch.Tensor, str]:
    """The bar's σ list: Karras for digits, the flow model's own default (from σ = ∞) for
    digits-flow, whose σ range has no finite top for a Karras ramp in σ."""
    if model.table.kind == "flow":
        return schedules.build({"name": "flow", "steps": steps}, model.table), f"flow({steps})"
    return schedules.karras(steps), f"karras({steps})"


def evaluate_guidance(model, classifier, guidance: float, per_class: int, steps: int,
                      heldout_features: torch.Tensor, batch_size: int) -> tuple[dict, torch.Tensor]:
    prompts, seeds = class_prompts(per_class)
    sigmas, name = schedule(model, steps)
    out = sample(model, sigmas, prompts, seeds, solver="dpmpp_2m",
                 guidance=guidance, batch_size=batch_size)
    predicted = classifier.predict(out.images)
    wanted = torch.tensor(prompts)
    hits = predicted == wanted
    per_class_rate = {str(c): float(hits[wanted == c].float().mean()) for c in range(NUM_CLASSES)}
    result = {
        "guidance": guidance, "n": len(prompts), "steps": steps, "solver": "dpmpp_2m",
        "schedule": name, "seeds": [seeds[0], seeds[-1]],
        "recognition_rate": float(hits.float().mean()), "recognition_per_class": per_class_rate,
        "frechet_vs_heldout": frechet(classifier.features(out.images), heldout_features),
        "sampling_seconds": round(sum(out.seconds.values()), 2),
    }
    return result, out.images


def time_model_call(model, images: int, guidance: float, repeats: int = 10) -> float:
    """Median seconds of one denoiser call on ``images`` images (CFG doubles the UNet batch)."""
    cond = model.condition([i % NUM_CLASSES for i in range(images)])
    x = torch.randn((images, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.denoise(x, 1.0, cond, guidance)  # warm-up: first calls pick kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.denoise(x, 1.0, cond, guidance)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_grid(images: torch.Tensor, per_row: int = 10):
    """One row per class: the first ``per_row`` samples of each (images are ordered i % 10)."""
    rows = [images[c::NUM_CLASSES][:per_row] for c in range(NUM_CLASSES)]
    return grid(torch.cat(rows), nrow=per_row, pad=1, scale=6)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["digits", "digits-flow"], default="digits")
    p.add_argument("--guidance", type=float, default=2.0, help="the guidance the bar is judged at")
    p.add_argument("--sweep", type=float, nargs="*", default=[1.0, 1.5, 3.0, 4.0],
                   help="further guidance values, reported for context")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="a folder written by digits_train (or digits_flow_train) --out "
                        "(default: the shipped weights)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for <model>_quality.json and <model>_samples.png (default: "
                        "analysis/results, the committed results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = load_digits_flow if args.model == "digits-flow" else load_digits
    model = loader(device="cpu", weights_dir=args.weights_dir)
    classifier = load_classifier(device="cpu", weights_dir=args.weights_dir)
    train_images, _ = digits_data("train")
    heldout_images, _ = digits_data("heldout")
    heldout_features = classifier.features(to_unit(heldout_images))
    reference = frechet(classifier.features(to_unit(train_images)), heldout_features)
    accuracy = heldout_accuracy(classifier)

    main_result, images = evaluate_guidance(model, classifier, args.guidance, args.per_class,
                                            args.steps, heldout_features, args.batch_size)
    sweep = [evaluate_guidance(model, classifier, w, args.per_class, args.steps,
                               heldout_features, args.batch_size)[0]
             for w in args.sweep if w != args.guidance]

    ratio = main_result["frechet_vs_heldout"] / reference
    report = {
        "model": model.fingerprint(), "family": model.family,
        "classifier": classifier.fingerprint(),
        "classifier_feature_dim": classifier.dim,
        "heldout_accuracy": accuracy,
        "frechet_train_vs_heldout": reference,
        "bar": main_result,
        "frechet_ratio": ratio,
        "passed": {"accuracy": accuracy >= ACCURACY_BAR,
                   "recognition": main_result["recognition_rate"] >= RECOGNITION_BAR,
                   "frechet": ratio <= FRECHET_RATIO_BAR},
        "sweep": sweep,
        "seconds_per_call": {
            "cfg_256_images": time_model_call(model, 256, args.guidance),
            "cfg_512_images": time_model_call(model, 512, args.guidance),
            "no_cfg_256_images": time_model_call(model, 256, 1.0),
        },
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.model.replace("-", "_")
    with open(args.out / f"{stem}_quality.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    sample_grid(images).save(args.out / f"{stem}_samples.png")
    print(json.dumps({k: report[k] for k in ("heldout_accuracy", "frechet_train_vs_heldout",
                                             "frechet_ratio", "passed", "seconds_per_call")},
                     indent=2))
    print(f"recognition {main_result['recognition_rate']:.3f} at guidance {args.guidance}; "
          f"Fréchet {main_result['frechet_vs_heldout']:.3f} vs reference {reference:.3f}")
    for r in sweep:
        print(f"  guidance {r['guidance']}: recognition {r['recognition_rate']:.3f}, "
              f"Fréchet {r['frechet_vs_heldout']:.3f}")
    return 0 if all(report["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
