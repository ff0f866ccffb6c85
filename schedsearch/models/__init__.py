"""Models as denoisers: the contract every model the sampler takes fulfils (``Model``), the
model families, their usual guidance and prompts, and ``load``, which picks the backend from a
model spec: ``digits`` (the default everywhere), ``gmm``, their flow-matching twins
``digits-flow`` and ``gmm-flow``, a hub id, a local diffusers folder, or a single
``.safetensors`` checkpoint (Stable Diffusion 1.x/2.x/XL, SD3/SD3.5 and FLUX).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..noise import FlowTable, NoiseTable
from .diffusers_load import hub_calls
from .diffusers_flow import is_flow_pipeline, load_flow_pipeline
from .diffusers_sd import load_stable_diffusion
from .digits import load_digits
from .digits_flow import load_digits_flow
from .gmm import GaussianMixture
from .gmm_flow import FlowGaussianMixture

BUILTIN = ("digits", "gmm", "digits-flow", "gmm-flow")
# Every model family a backend reports. sd15 covers SD1.x; sd2 the SD2.x models (OpenCLIP text
# encoder, v-prediction at 768²); sd3 SD3 and SD3.5 (MMDiT, flow matching); flux the FLUX.1
# models (guidance-distilled flow matching); the testbeds are families of their own.
FAMILIES = ("sd15", "sd2", "sdxl", "digits", "gmm", "sd3", "flux", "digits-flow", "gmm-flow")
# The families whose models are flow-matching ones: a FlowTable, σ lists from ∞ (docs/flow.md).
FLOW_FAMILIES = ("sd3", "flux", "digits-flow", "gmm-flow")


@runtime_checkable
class Model(Protocol):
    """What the sampler, the scorer, the teacher and the search need from a model."""

    name: str
    family: str                       # one of FAMILIES
    table: NoiseTable | FlowTable     # the model's noise table (a FlowTable for flow models)
    latent_shape: tuple               # the shape of one sample, e.g. (4, 64, 64)
    device: torch.device
    dtype: torch.dtype
    unet: Any                         # the diffusers UNet2DConditionModel FreeU acts on, or None

    def fingerprint(self) -> str:
        """Identifies the weights (for caches and provenance)."""

    def describe(self) -> dict:
        """JSON-able facts for provenance (name, family, fingerprint, resolution, ...)."""

    def condition(self, prompts: Sequence) -> Any:
        """Conditioning for a batch of prompts (text, or class labels for the testbeds)."""

    def denoise(self, x: torch.Tensor, sigma, cond: Any, guidance: float) -> torch.Tensor:
        """One model call: D(x; σ) with classifier-free guidance, σ a float or a (B,) tensor.
        A flow model also takes σ = ∞, where x is the noise ε itself."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to float images in [0, 1], (N, C, H, W); the gmm testbed returns its vectors."""


def schedule_family(family: str) -> str:
    """The published schedule tables (AYS, the paper's presets) a model family uses: the SDXL ones
    for SDXL, the SD1.5 ones for everything else on the SD noise table."""
    return "sdxl" if family == "sdxl" else "sd15"

# The usual CFG scale and prompt source per model family, for every command. digits runs at 4, not
# the gentler 2 of its quality bar: at 2 its DPM++2M is converged by 5 steps and there is nothing to
# search, while at 4 (like SD at 5.5-7.5) few-step sampling has real error left.
DEFAULT_GUIDANCE = {"digits": 4.0, "gmm": 3.0, "sd15": 5.5, "sd2": 5.5, "sdxl": 7.5}
DEFAULT_PROMPTS = {"digits": "classes:10", "gmm": "classes:4"}
# The flow twins run at their ε twins' scale; SD3 at its pipeline's default CFG; FLUX's value is
# its distilled guidance (an input of the transformer, not CFG: one call per NFE).
DEFAULT_GUIDANCE.update({"digits-flow": 4.0, "gmm-flow": 3.0, "sd3": 7.0, "flux": 3.5})
DEFAULT_PROMPTS.update({"digits-flow": "classes:10", "gmm-flow": "classes:4"})


def is_flow(family: str) -> bool:
    """Whether a model family is a flow-matching one (its σ lists start at ∞)."""
    return family in FLOW_FAMILIES


def default_guidance(family: str) -> float:
    return DEFAULT_GUIDANCE.get(family, 5.5)


def check_prompts(model: Model, prompts, source) -> None:
    """A testbed's prompts are class labels: one it does not have is one line naming the source
    now, not an error once sampling is under way (in every trial and baseline of a study)."""
    if model.family in DEFAULT_PROMPTS:
        try:
            model.condition(list(dict.fromkeys(prompts)))
        except ValueError as exc:
            raise ValueError(f"prompts {source}: {exc}") from None


def default_prompts(model: Model) -> str:
    """``classes:K`` for the class-conditional testbeds; text models need a prompt file."""
    return prompt_source(model.family, name=model.name)


def prompt_source(family: str, prompts: Optional[str] = None, *, name: Optional[str] = None
                  ) -> str:
    """``prompts`` if given, else the testbed's ``classes:K``. ``family`` may be a model spec: a
    testbed's spec is its family, so a text model's missing prompts are said before it loads."""
    if prompts and prompts.startswith("classes:") and family not in DEFAULT_PROMPTS:
        # class labels are integers; a text model would fail every image, after loading
        raise ValueError(f"{name or family} is a text-to-image model and {prompts} are a "
                         f"testbed's class labels: pass --prompts FILE (a text file with one "
                         f"prompt per line, a CSV, or a COCO captions JSON)")
    if prompts:
        return prompts
    if family not in DEFAULT_PROMPTS:
        raise ValueError(f"{name or family} needs prompts: pass --prompts FILE (a text file with "
                         f"one prompt per line, a CSV, or a COCO captions JSON)")
    return DEFAULT_PROMPTS[family]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Optional[str | torch.device]) -> torch.device:
    """``device`` as a torch device (None: CUDA if there is one), with one line for a name torch
    does not know and for a CUDA device this machine does not have."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda or "
                         f"cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for, but no CUDA device is available "
                             f"here")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    return dev


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
         dtype: Optional[str | torch.dtype] = None, **kwargs) -> Model:
    """Load a model by spec; see the module docstring."""
    device = resolve_device(device)
    dt = resolve_dtype(dtype, device)
    if spec == "gmm":
        return GaussianMixture.default(device=device, dtype=torch.float32, **kwargs)
    if spec == "digits":
        return load_digits(device=device, dtype=dt, **kwargs)
    if spec == "gmm-flow":
        return FlowGaussianMixture.default(device=device, dtype=torch.float32, **kwargs)
    if spec == "digits-flow":
        return load_digits_flow(device=device, dtype=dt, **kwargs)
    with hub_calls():
        if is_flow_pipeline(spec, local_files_only=kwargs.get("local_files_only"),
                            revision=kwargs.get("revision")):
            return load_flow_pipeline(spec, device=device, dtype=dt, **kwargs)
        return load_stable_diffusion(spec, device=device, dtype=dt, **kwargs)
