"""Apply a preset: sample with its σ list, solver, FreeU plan and guidance through our sampler.

    import schedsearch
    preset = schedsearch.load_preset("sd15-5")                 # shipped, exported, or a .json path
    images = schedsearch.generate(pipe, preset, ["a red bicycle"], seeds=[0])   # PIL images

``pipe`` may be a diffusers Stable Diffusion / SDXL pipeline, a model spec (``"digits"``, a hub id,
a folder, a ``.safetensors`` file) or an already loaded schedsearch model.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from .presets import Preset, load as load_preset
from .sampler import Samples, sample


def as_model(model_or_pipe, **kwargs):
    """A schedsearch model from a spec string, a diffusers pipeline, or a model (unchanged)."""
    if isinstance(model_or_pipe, str):
        from .models import load
        return load(model_or_pipe, **kwargs)
    if hasattr(model_or_pipe, "denoise") and hasattr(model_or_pipe, "condition"):
        return model_or_pipe
    if hasattr(model_or_pipe, "unet") and hasattr(model_or_pipe, "vae"):
        from .models.diffusers_sd import from_pipeline
        return from_pipeline(model_or_pipe, **kwargs)
    raise TypeError(f"expected a model spec, a diffusers pipeline or a schedsearch model, got "
                    f"{type(model_or_pipe).__name__}")


def generate(model_or_pipe, preset: Preset | str, prompts: Sequence, seeds: Optional[Sequence[int]] = None,
             *, guidance: Optional[float] = None, batch_size: int = 8, output: str = "pil",
             progress=None) -> list | Samples:
    """Sample one image per (prompt, seed). ``output``: "pil" (a list of PIL images) or "samples"
    (the sampler's ``Samples``: latents, images as tensors, timings)."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    model = as_model(model_or_pipe)
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if preset.family not in ("any", getattr(model, "family", "any")):
        warnings.warn(f"preset {preset.name} was made for {preset.family} models; applying it to "
                      f"a {model.family} model", stacklevel=2)
    plan = preset.freeu if preset.freeu is not None and getattr(model, "unet", None) is not None else None
    if preset.freeu is not None and plan is None:
        warnings.warn(f"{model.name} has no UNet: the preset's FreeU plan is skipped", stacklevel=2)
    g = guidance if guidance is not None else preset.guidance
    if g is None:
        raise ValueError(f"preset {preset.name} has no guidance; pass guidance=")
    out = sample(model, preset.sigmas, prompts, seeds, solver=preset.solver, guidance=g,
                 freeu=plan, batch_size=batch_size, progress=progress)
    if output == "samples":
        return out
    if output != "pil":
        raise ValueError(f"output must be 'pil' or 'samples', got {output!r}")
    return to_pil(out)


def to_pil(samples: Samples) -> list:
    from PIL import Image

    from .sampler import to_uint8

    if samples.images is None or samples.images.ndim != 4:
        raise ValueError("these samples are not images (the gmm testbed samples vectors)")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(samples.images)]
