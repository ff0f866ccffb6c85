"""Models as denoisers. Every model the sampler takes has:

* ``name``, ``family`` (``sd15``, ``sd2``, ``sdxl``, ``digits``, ``gmm`` — picks AYS tables and presets),
  ``fingerprint()`` (identifies the weights, for caches and provenance);
* ``table`` (a ``NoiseTable``), ``latent_shape`` (per image), ``device``, ``dtype``;
* ``unet``: the diffusers ``UNet2DConditionModel`` FreeU acts on, or None;
* ``condition(prompts) -> cond``: conditioning for a batch (prompt embeddings are cached per prompt);
* ``denoise(x, sigma, cond, guidance) -> D``: one model call (CFG batched), σ a float or (B,) tensor;
* ``decode(latents) -> images``: float in [0, 1], (N, C, H, W) (the gmm testbed returns its vectors).

``load`` picks the backend from a model spec: ``digits`` (the default everywhere), ``gmm``, a hub
id, a local diffusers folder, or a single ``.safetensors`` checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch

BUILTIN = ("digits", "gmm")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked otherwise; fp16/bf16 on CPU are refused (slow,
    and several CPU kernels lack half precision)."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype in (None, "auto"):
        chosen = torch.float16 if device.type == "cuda" else torch.float32
    else:
        table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in table:
            raise ValueError(f"dtype must be one of fp32, fp16, bf16 or auto, got {dtype!r}")
        chosen = table[dtype]
    if device.type == "cpu" and chosen != torch.float32:
        raise ValueError(f"{chosen} on the CPU is not supported; use --dtype fp32 (the default "
                         "on CPU) or run on a CUDA device")
    return chosen


def load(spec: str = "digits", *, device: Optional[str | torch.device] = None,
         dtype: Optional[str | torch.dtype] = None, **kwargs):
    """Load a model by spec; see the module docstring."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available here")
    dt = resolve_dtype(dtype, device)
    if spec == "gmm":
        from .gmm import GaussianMixture
        return GaussianMixture.default(device=device, dtype=torch.float32, **kwargs)
    if spec == "digits":
        from .digits import load_digits
        return load_digits(device=device, dtype=dt, **kwargs)
    from .diffusers_sd import load_stable_diffusion
    return load_stable_diffusion(spec, device=device, dtype=dt, **kwargs)
