"""Apply a preset: sample with its σ list, solver, FreeU plan and guidance through our sampler.

    import schedsearch
    preset = schedsearch.load_preset("sd15-5")                 # shipped, exported, or a .json path
    images = schedsearch.generate(pipe, preset, ["a red bicycle"], seeds=[0])   # PIL images

``pipe`` may be a diffusers Stable Diffusion / SDXL or SD3 / FLUX pipeline, a model spec
(``"digits"``, a hub id, a folder, a ``.safetensors`` file) or an already loaded schedsearch model.
A pipeline is wrapped as a schedsearch model (``from_pipeline``, ``from_flow_pipeline``): its
components are used, its scheduler only read for the noise table.
"""

from __future__ import annotations

import numbers
import os
import warnings
from typing import Optional, Sequence

from PIL import Image

from .models import BUILTIN, Model, load
from .models.diffusers_flow import FLOW_SUPPORTED, from_flow_pipeline
from .models.diffusers_sd import SUPPORTED, from_pipeline
from .presets import Preset, as_preset, fit
from .sampler import Samples, sample, to_uint8


def as_model(model_or_pipe, **kwargs) -> Model:
    """A schedsearch model from a spec string, a diffusers pipeline, or a model (unchanged)."""
    if isinstance(model_or_pipe, str):
        return load(model_or_pipe, **kwargs)
    if isinstance(model_or_pipe, Model):
        return model_or_pipe
    if type(model_or_pipe).__name__ in SUPPORTED:
        return from_pipeline(model_or_pipe, **kwargs)
    if type(model_or_pipe).__name__ in FLOW_SUPPORTED:   # SD3 / FLUX: σ lists from ∞
        return from_flow_pipeline(model_or_pipe, **kwargs)
    raise TypeError(f"expected a model spec, a diffusers pipeline or a schedsearch model, got "
                    f"{type(model_or_pipe).__name__}")


def generate(model_or_pipe, preset: Preset | str | os.PathLike | dict, prompts: Sequence, seeds: Optional[Sequence[int]] = None,
             *, guidance: Optional[float] = None, batch_size: int = 8, output: str = "pil",
             progress=None, allow_outside_table: bool = False, height: Optional[int] = None,
             width: Optional[int] = None) -> list | Samples:
    """Sample one image per (prompt, seed). ``output``: "pil" (a list of PIL images) or "samples"
    (the sampler's ``Samples``: latents, images as tensors, timings). A σ list outside the
    model's noise table, or a preset made for the other kind of model (flow-matching vs DDPM), is
    refused unless ``allow_outside_table`` lifts the former (see ``presets.fit``). ``height``,
    ``width``: the image size when ``model_or_pipe`` is a pipeline (default its native one).
    ``preset``: a Preset, a preset name or path, or its JSON object. ``prompts`` may be one
    string (or a testbed's class label), as a diffusers pipeline takes it, and ``seeds`` one int
    (default: 0, 1, … one per prompt)."""
    if output not in ("pil", "samples"):   # before the sampling, not after it
        raise ValueError(f"output must be 'pil' or 'samples', got {output!r}")
    preset = as_preset(preset)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if size and (isinstance(model_or_pipe, Model) or (isinstance(model_or_pipe, str)
                                                   and model_or_pipe in BUILTIN)):
        # a loaded model has its size; a testbed has only one (it was silently ignored, or a
        # TypeError from the testbed's loader)
        raise ValueError(f"{' and '.join(size)} set the image size of a pipeline or a model spec "
                         f"to load; {getattr(model_or_pipe, 'name', model_or_pipe)} has its own")
    model = as_model(model_or_pipe, **size)
    prompts, seeds = _as_lists(prompts, seeds)
    preset, notes = fit(preset, model, guidance, allow_outside_table=allow_outside_table)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    out = sample(model, preset.sigmas, prompts, seeds, solver=preset.solver,
                 guidance=preset.guidance, freeu=preset.freeu, batch_size=batch_size,
                 progress=progress)
    return out if output == "samples" else to_pil(out)


def _as_lists(prompts, seeds) -> tuple[list, list]:
    """One prompt (a string, or a testbed's class label) and one seed as pipelines take them, or
    lists of them; a string of seeds would be read digit by digit, so it is refused."""
    if prompts is None:
        raise ValueError("prompts must be a prompt or a list of prompts, got None (a testbed's "
                         "unconditional image is the prompt None in a list: [None])")
    if getattr(prompts, "ndim", None) == 0:   # a 0-d tensor or array: one class label
        prompts = prompts.item()
    prompts = [prompts] if isinstance(prompts, (str, numbers.Integral)) else list(prompts)
    if seeds is None:
        return prompts, list(range(len(prompts)))
    if getattr(seeds, "ndim", None) == 0:     # one seed, as a 0-d tensor or array
        seeds = seeds.item()
    if isinstance(seeds, (str, bytes, float)):
        raise ValueError(f"seeds must be an integer or a list of integers, got {seeds!r}")
    return prompts, [seeds] if isinstance(seeds, numbers.Integral) else list(seeds)


def to_pil(samples: Samples) -> list:
    if not isinstance(samples, Samples):
        raise TypeError(f"to_pil takes the Samples of generate(..., output='samples'), got "
                        f"{type(samples).__name__} (generate's default output is PIL images "
                        f"already)")
    if samples.images is None or samples.images.ndim != 4:
        raise ValueError("these samples are not images (the gmm testbed samples vectors)")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(samples.images)]
