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

# The usual CFG scale and prompt source per model family, for every command. digits runs at 4, not
# the gentler 2 of its quality bar: at 2 its DPM++2M is converged by 5 steps and there is nothing to
# search, while at 4 (like SD at 5.5-7.5) few-step sampling has real error left.
DEFAULT_GUIDANCE = {"digits": 4.0, "gmm": 3.0, "sd15": 5.5, "sd2": 5.5, "sdxl": 7.5}
DEFAULT_PROMPTS = {"digits": "classes:10", "gmm": "classes:4"}


def _family(model_or_family) -> Optional[str]:
    return model_or_family if isinstance(model_or_family, str) else getattr(model_or_family, "family", None)


def default_guidance(model_or_family) -> float:
    return DEFAULT_GUIDANCE.get(_family(model_or_family), 5.5)


def default_prompts(model_or_family) -> str:
    """``classes:K`` for the class-conditional testbeds; text models need a prompt file."""
    family = _family(model_or_family)
    if family not in DEFAULT_PROMPTS:
        name = getattr(model_or_family, "name", model_or_family)
        raise ValueError(f"{name} needs prompts: pass --prompts FILE (a text file with one prompt "
                         f"per line, a CSV, or a COCO captions JSON)")
    return DEFAULT_PROMPTS[family]


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
