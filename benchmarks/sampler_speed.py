"""Sampler speed: schedsearch's sampler against diffusers' own pipeline on the same UNet.

The UNet is the real SD1.5 architecture (its published config, random weights: speed does not
depend on the weights); the text encoder and VAE are tiny, because the comparison is the denoising
loop — both sides get the same precomputed prompt embeddings and stop at latents. diffusers runs
``DPMSolverMultistepScheduler`` with Karras sigmas; we run DPM++2M on the same Karras σ list. Runs
alternate (ours, theirs, ours, ...) so machine noise hits both alike; the ratio of medians is the
figure.

    python benchmarks/sampler_speed.py                      # CUDA if present, else a CPU-sized run
    python benchmarks/sampler_speed.py --device cuda --size 512 --batch 8 --steps 5 20

Writes benchmarks/results/sampler_speed.json (the committed results) unless --out says otherwise;
the JSON records the device, dtype, size, batch and repeats the figures come from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SD15_UNET = dict(  # the published stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)


def build(device, dtype):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny import tiny_tokenizer, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=1000, max_position_embeddings=77,
                                        projection_dim=768))
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, steps_offset=1,
                                        beta_end=0.012, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="zero")
    pipe = StableDiffusionPipeline(unet=unet, vae=tiny_vae(), text_encoder=text, tokenizer=tiny_tokenizer(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--size", type=int, default=512 if cuda else 256, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=8 if cuda else 2)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--repeats", type=int, default=5 if cuda else 2,
                    help="timed runs per side and step count; the figure is their median "
                         "(default: 5 on CUDA, 2 on a CPU)")
    ap.add_argument("--guidance", type=float, default=5.5)
    # from the repo root, not the working directory, so a run from elsewhere lands in the same file
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampler_speed.json"),
                    help="JSON file to write (default: benchmarks/results/sampler_speed.json, "
                         "the committed results)")
    args = ap.parse_args()

    from schedsearch import schedules
    from schedsearch.models.diffusers_sd import from_pipeline
    from schedsearch.sampler import sample

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build(device, dtype)
    # the pipeline's UNet runs the whole batch in one call, so ours does too (eval_batch = batch)
    model = from_pipeline(pipe, eval_batch=args.batch, height=args.size, width=args.size)
    prompts = [f"prompt {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    cond = model.condition(prompts)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def theirs(steps):
        g = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        t0 = time.perf_counter()
        pipe(prompt_embeds=cond.cond.to(device, dtype), negative_prompt_embeds=cond.uncond.to(device, dtype),
             num_inference_steps=steps, guidance_scale=args.guidance, height=args.size, width=args.size,
             generator=g, output_type="latent")
        sync()
        return time.perf_counter() - t0, None

    def ours(steps):
        t0 = time.perf_counter()
        out = sample(model, schedules.karras(steps, model.table.sigma_min, model.table.sigma_max),
                     prompts, seeds, solver="dpmpp_2m", guidance=args.guidance,
                     batch_size=args.batch, decode=False)
        sync()
        return time.perf_counter() - t0, out.seconds

    results = []
    with torch.inference_mode():
        ours(2), theirs(2)  # warm-up: kernels, allocator
        for steps in args.steps:
            t_ours, t_theirs, inside = [], [], []
            for _ in range(args.repeats):
                t, sec = ours(steps)
                t_ours.append(t)
                inside.append(sec["model"] / max(t, 1e-9))
                t_theirs.append(theirs(steps)[0])
            row = {"steps": steps, "batch": args.batch, "size": args.size, "device": str(device),
                   "dtype": str(dtype), "ours_s": statistics.median(t_ours),
                   "diffusers_s": statistics.median(t_theirs),
                   "ours_images_per_s": args.batch / statistics.median(t_ours),
                   "diffusers_images_per_s": args.batch / statistics.median(t_theirs),
                   "speed_ratio": statistics.median(t_theirs) / statistics.median(t_ours),
                   "share_in_model_calls": statistics.median(inside)}
            results.append(row)
            print(f"{steps:>3} steps: ours {row['ours_images_per_s']:.3f} img/s, diffusers "
                  f"{row['diffusers_images_per_s']:.3f} img/s, ratio {row['speed_ratio']:.3f}; "
                  f"{100 * row['share_in_model_calls']:.1f}% of our time inside model calls", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # repeats and device recorded so a quoted "median of N" can be checked against the file
    Path(args.out).write_text(json.dumps({"results": results, "device": str(device),
                                          "dtype": str(dtype), "repeats": args.repeats,
                                          "guidance": args.guidance, "torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
