"""A preset as a ComfyUI workflow in API format, and the lines that say where ComfyUI differs.

API format is a JSON object of node id → ``{"class_type", "inputs"}``, a link written as
``[node_id, output_index]``. The graph built here, from stock nodes only::

    CheckpointLoaderSimple ─ MODEL ─(FreeU)─┐
      ├ CLIP → CLIPTextEncode ×2 ───────────┤
      └ VAE ─────────────────┐              ├→ SamplerCustom ─ output → VAEDecode → SaveImage
    ManualSigmas (the σ list) ──────────────┤
    KSamplerSelect / SamplerDPMPP_3M_SDE ───┤
    EmptyLatentImage ───────────────────────┘

SamplerCustom rather than SamplerCustomAdvanced: both run the same CFGGuider.sample; the advanced
one only splits noise and guidance into RandomNoise and CFGGuider nodes.

The decoded latent is SamplerCustom's ``output`` (index 0): the solver's final state at the last σ,
which is what schedsearch decodes too. With a σ list ending above 0 (the paper's "leftover noise"
presets) that state keeps noise of scale σ_end; k-diffusion samplers in ComfyUI take an ordinary
step to any σ_end > 0 and only special-case σ = 0. ``denoised_output`` is the x0 estimate of the
last model call (latent_preview's callback), a different image.

No notes go into the workflow: ComfyUI's prompt validation treats every top-level key as a node and
rejects one without ``class_type`` ("Cannot execute because a node is missing the class_type
property", execution.py ``validate_prompt``). Nodes carry ``_meta.title``, which ComfyUI's own API
export writes and its validation ignores. The caveats come from ``notes``; ``export`` returns both.

What each mapping rests on (ComfyUI source, the commits in tests/fixtures/comfy_nodes.json):
comfy/k_diffusion/sampling.py (sample_euler, sample_heun, sample_dpmpp_2m, sample_dpmpp_3m_sde,
sample_ipndm), comfy/extra_samplers/uni_pc.py (sample_unipc), comfy/samplers.py (sampler_object,
Sampler.max_denoise), comfy/model_sampling.py (EPS.noise_scaling, ModelSamplingDiscrete.timestep),
comfy_extras/nodes_custom_sampler.py (ManualSigmas, SamplerCustom) and nodes_freelunch.py (FreeU).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .freeu import FreeUPlan
from .models import FLOW_FAMILIES, default_guidance
from .noise import SD, flow_t

DEFAULT_CHECKPOINT = "model.safetensors"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
# Native resolution per family; "any" presets get SD1.5's and a note saying to set it.
RESOLUTION = {"sd15": 512, "sd2": 768, "sdxl": 1024, "any": 512}
MAX_RESOLUTION = 16384          # nodes.py MAX_RESOLUTION, EmptyLatentImage's max
MAX_SEED = 0xFFFFFFFFFFFFFFFF   # SamplerCustom noise_seed max
FREEU_MAX = 10.0                # FreeU node: b1, b2, s1, s2 in [0, 10]
# ManualSigmas.execute parses with exactly this, then torch.FloatTensor: no exponents, float32.
_MANUAL_SIGMAS = re.compile(r"[-+]?(?:\d*\.*\d+)")
# Sampler.max_denoise: σ₀ within this of σ_max counts as "start from pure noise".
_MAX_DENOISE_RTOL = 1e-5
# A σ whose fractional timestep is this close to a whole one is on the grid (the 6-decimal σ
# string moves t by < 1e-4).
_WHOLE_T_TOL = 1e-3


@dataclass(frozen=True)
class ComfySampler:
    """The node that makes SamplerCustom's SAMPLER input, and what ComfyUI then runs."""

    node: str
    inputs: dict
    runs: str  # the function ComfyUI calls, for messages and docs


def _select(name: str) -> ComfySampler:
    return ComfySampler("KSamplerSelect", {"sampler_name": name}, f"sample_{name}")


# schedsearch solver → ComfyUI sampler. Exact unless solver_caveat says otherwise.
SAMPLERS = {
    # Euler on dx/dσ = (x − D)/σ is x + (x − D)(σ'−σ)/σ = (σ'/σ)·x + (1 − σ'/σ)·D: first-order
    # DPM-Solver++ / DDIM on an explicit σ list. ComfyUI's "ddim" is this same sample_euler with a
    # random inpaint option (sampler_object), so "euler" names what runs.
    "dpmpp_1s": _select("euler"),
    "euler": _select("euler"),
    "heun": _select("heun"),
    "dpmpp_2m": _select("dpmpp_2m"),
    # Deterministic 3M is sample_dpmpp_3m_sde with eta = 0; KSamplerSelect's "dpmpp_3m_sde" runs
    # eta = 1 (an SDE), so the eta has to come from this node. With eta = 0 it adds no noise.
    "dpmpp_3m": ComfySampler("SamplerDPMPP_3M_SDE",
                             {"eta": 0.0, "s_noise": 1.0, "noise_device": "cpu"},
                             "sample_dpmpp_3m_sde"),
    # uni_pc_bh2: B(h) = expm1(−h), order min(3, steps − 1), lower order at the last two steps,
    # corrector on every step but the last: the same orders and weights as schedsearch's unipc.
    "unipc": ComfySampler("KSamplerSelect", {"sampler_name": "uni_pc_bh2"},
                          "uni_pc.sample_unipc_bh2"),
    # uni_pc: the same sampler with B(h) = h, i.e. schedsearch's unipc_bh1.
    "unipc_bh1": ComfySampler("KSamplerSelect", {"sampler_name": "uni_pc"},
                              "uni_pc.sample_unipc"),
    "ipndm": _select("ipndm"),
}


def _is_uni_pc(solver: str) -> bool:
    """Whether ComfyUI runs the solver with its uni_pc module (both B(h) variants), whose quirks
    the two functions below handle."""
    return solver in SAMPLERS and SAMPLERS[solver].runs.startswith("uni_pc.")


def comfy_sampler(preset) -> ComfySampler:
    """The ComfyUI sampler for the preset's solver on its σ list."""
    if preset.solver not in SAMPLERS:
        raise ValueError(f"no ComfyUI sampler is known for solver {preset.solver!r}")
    if _is_uni_pc(preset.solver) and preset.steps == 1:
        # ComfyUI's uni_pc runs order min(3, steps − 1) = 0 for one step and never moves x; a
        # one-step UniPC is a single DDIM step, which euler is exactly.
        return SAMPLERS["euler"]
    return SAMPLERS[preset.solver]


def solver_caveat(preset) -> Optional[str]:
    """One line when ComfyUI's sampler does not take exactly the preset's solver steps."""
    if preset.steps < 2 or float(preset.sigmas[-1]) != 0:
        return None
    if _is_uni_pc(preset.solver):
        name = SAMPLERS[preset.solver].inputs["sampler_name"]
        return (f"solver {preset.solver} runs as ComfyUI's {name}, which replaces a final σ = 0 "
                "by 0.001 (comfy/extra_samplers/uni_pc.py, sample_unipc): its last step lands at "
                "σ = 0.001 and the image keeps noise of that scale, where schedsearch ends at "
                "x = D")
    if preset.solver == "ipndm":
        return (f"solver ipndm runs as ComfyUI's ipndm, whose step to σ = 0 is x = D (first order, "
                f"comfy/k_diffusion/sampling.py, sample_ipndm) where schedsearch takes its "
                f"order-{min(4, preset.steps)} Adams–Bashforth step to 0")
    return None


def freeu_mapping(plan: Optional[FreeUPlan]) -> tuple[Optional[dict], Optional[str]]:
    """(the FreeU node's b1, b2, s1, s2 or None, a caveat line or None) for a FreeU plan.

    ComfyUI's FreeU node patches every model call with one setting, so only a plan that is one
    setting from step 0 has a node. That node scales the backbone features wherever their channel
    count is model_channels·4 (b1, s1) or ·2 (b2, s2), at every output block: the FreeU authors'
    patch, i.e. the plan's "original" variant. FreeU_V2 is the authors' later v2 rule (the backbone
    factor modulated by the normalised mean feature map), which neither variant computes.
    """
    if plan is None or not plan.active:
        return None, None
    first = plan.steps[0]
    if first is None or any(s != first for s in plan.steps):
        return None, (f"FreeU plan ({plan.describe()}) cannot be expressed in stock ComfyUI nodes, "
                      f"whose FreeU applies one setting to every step: the workflow runs without "
                      f"FreeU")
    values = first.as_dict()
    if max(values.values()) > FREEU_MAX:
        return None, (f"FreeU {values} is outside the FreeU node's range [0, {FREEU_MAX:g}]: the "
                      f"workflow runs without FreeU")
    if plan.variant == "diffusers":
        return values, ("FreeU: ComfyUI's FreeU node applies the factors by channel count at every "
                        "up-block resnet (the FreeU authors' patch, schedsearch's 'original' "
                        "variant); this preset's 'diffusers' variant acts on the first two "
                        "up-blocks only, so the images differ")
    return values, None


def freeu_caveat(preset) -> Optional[str]:
    """The FreeU line alone (None when the workflow carries the preset's plan exactly)."""
    return freeu_mapping(preset.freeu)[1]


def parse_manual_sigmas(text: str) -> list[float]:
    """The σ list ComfyUI's ManualSigmas node makes of ``text`` (its regex, then float32)."""
    return [float(np.float32(float(v))) for v in _MANUAL_SIGMAS.findall(text)]


def sigma_string(sigmas) -> str:
    """A σ list as ManualSigmas reads it: fixed-point, comma-separated; refused
    when ManualSigmas would not read back the same number of strictly decreasing values."""
    return _manual_text([float(s) for s in sigmas], 6, "σ values (too small for 6 decimals?)")


def _manual_text(values: list[float], decimals: int, what: str) -> str:
    """``values`` printed for ManualSigmas, checked by reading them back with its parser: the
    same count, strictly decreasing, and no value > 0 printed as 0 (which would also turn a
    leftover-noise end into a final σ = 0)."""
    text = ", ".join(f"{v:.{decimals}f}" for v in values)
    parsed = parse_manual_sigmas(text)
    ok = (len(parsed) == len(values)
          and all((p > 0) == (v > 0) for p, v in zip(parsed, values))
          and all(a > b for a, b in zip(parsed, parsed[1:])))
    if not ok:
        raise ValueError(f"ManualSigmas would read {text!r} as {parsed}, not these "
                         f"{len(values)} {what}")
    return text


# -- flow-matching presets: ComfyUI's "sigma" of a flow model is its time t ------------------------
# ComfyUI runs a flow model (SD3, FLUX: model_sampling CONST) on x_t with t in place of σ: its noise
# at the first point is t_0·ε + (1 − t_0)·latent, its denoised value x_t − t·v, and the final state
# is divided by 1 − t_N (CONST.inverse_noise_scaling), i.e. y. A flow preset's list therefore goes
# to ManualSigmas as t = σ/(1+σ), ∞ → 1.0. 8 decimals: t lives in [0, 1], and its low end (the
# knots' floor, t ≈ 0.0005) would keep one significant digit at 6.
FLOW_T_DECIMALS = 8


def is_flow(preset) -> bool:
    """A preset made for a flow-matching model: a flow family, or a σ list from ∞."""
    return preset.family in FLOW_FAMILIES or math.isinf(float(preset.sigmas[0]))


def flow_t_string(sigmas) -> str:
    """A flow preset's σ list as the t list ManualSigmas reads (∞ → 1.0, 0 → 0); refused when
    ManualSigmas would not read back the same number of strictly decreasing values."""
    return _manual_text([float(flow_t(float(s))) for s in sigmas], FLOW_T_DECIMALS,
                        "flow times t = σ/(1+σ) (two of them too close to 1 or to each other "
                        "for float32?)")


def manual_sigmas(preset) -> str:
    """What goes into ComfyUI's ManualSigmas for this preset: its σ list, or for a flow-matching
    preset its t list (ComfyUI's "sigma" of a flow model is t)."""
    return flow_t_string(preset.sigmas) if is_flow(preset) else sigma_string(preset.sigmas)


FLOW_WORKFLOW_REFUSED = (
    "a ComfyUI workflow for a flow-matching preset is not built: SD3 and FLUX need their own "
    "loaders (UNETLoader, DualCLIPLoader or TripleCLIPLoader, VAELoader), EmptySD3LatentImage and, "
    "for FLUX, FluxGuidance with cfg 1, nodes this exporter does not check against ComfyUI's "
    "source; put the t list of `--format comfy` into ManualSigmas of your SD3/FLUX workflow "
    "(sampler euler runs euler and dpmpp_1s presets exactly; ComfyUI's multistep samplers take "
    "log-t steps, not schedsearch's log-σ ones)")


def _start_noise_caveat(sigma0: float) -> Optional[str]:
    sigma_max = float(np.float32(SD.sigma_max))  # ComfyUI keeps its σ table in float32
    if not (math.isclose(sigma_max, sigma0, rel_tol=_MAX_DENOISE_RTOL) or sigma0 > sigma_max):
        return None
    louder = math.sqrt(1 + sigma0 ** 2) / sigma0 - 1
    return (f"ComfyUI starts from √(1+σ₀²)·ε, not σ₀·ε, because σ₀ = {sigma0:.6f} is the model's "
            f"σ_max (comfy/samplers.py Sampler.max_denoise → EPS.noise_scaling): "
            f"{100 * louder:.2f}% more initial noise than schedsearch's; the seed gives the same ε")


def _timestep_caveat(preset, parsed: list[float]) -> Optional[str]:
    # The σ values the model is called at: every σ but the last, and Heun also corrects at σ_end.
    called = parsed[:-1] + ([parsed[-1]] if preset.solver == "heun" and parsed[-1] > 0 else [])
    t = np.asarray(SD.sigma_to_t(np.asarray(called, dtype=np.float64)), dtype=np.float64)
    off = np.abs(t - np.round(t))
    between = int(np.sum(off > _WHOLE_T_TOL))
    if between == 0:
        return None
    return (f"ComfyUI gives the UNet the nearest whole timestep for each σ "
            f"(comfy/model_sampling.py ModelSamplingDiscrete.timestep); {between} of the "
            f"{len(called)} σ values the model is called at lie between whole timesteps (up to "
            f"{float(off.max()):.2f} off), where schedsearch feeds the fractional timestep")


def _check_family(preset) -> None:
    if is_flow(preset):
        raise ValueError(FLOW_WORKFLOW_REFUSED)
    if preset.family not in RESOLUTION:
        raise ValueError(f"preset {preset.name} is for the {preset.family} testbed, which ComfyUI "
                         f"cannot load; a ComfyUI workflow needs a preset for "
                         f"{', '.join(RESOLUTION)}")


def _resolution(preset, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    native = RESOLUTION[preset.family]
    out = []
    for name, v in (("width", width), ("height", height)):
        v = native if v is None else v
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 16 <= v <= MAX_RESOLUTION or v % 8:
            raise ValueError(f"{name} must be a multiple of 8 in [16, {MAX_RESOLUTION}], got {v!r}")
        out.append(int(v))   # a numpy integer is not JSON
    return out[0], out[1]


def guidance(preset) -> float:
    """The CFG scale the workflow uses: the preset's, else schedsearch's default for its family."""
    if preset.guidance is not None:
        return float(preset.guidance)
    return default_guidance(preset.family)


def notes(preset, *, width: Optional[int] = None, height: Optional[int] = None) -> list[str]:
    """Every way the workflow differs from schedsearch sampling the preset, one line each.

    Empty exactly when ComfyUI runs the same steps from the same start: a solver ComfyUI takes
    step for step, a FreeU plan it can carry as is, σ₀ below σ_max, σ values on whole timesteps,
    and the preset's own guidance and family resolution. ``width``/``height``: as given to
    ``workflow`` (a note on the resolution appears only when an "any" preset falls back to 512²).
    """
    _check_family(preset)
    parsed = parse_manual_sigmas(sigma_string(preset.sigmas))
    lines = [solver_caveat(preset), freeu_caveat(preset), _start_noise_caveat(parsed[0]),
             _timestep_caveat(preset, parsed)]
    if preset.guidance is None:
        lines.append(f"the preset sets no guidance: the workflow uses cfg {guidance(preset):g}, "
                     f"schedsearch's default for {preset.family}")
    if preset.family == "any" and (width is None or height is None):
        w, h = _resolution(preset, width, height)
        lines.append(f"the preset is for any model: the latent is {w}×{h}; set EmptyLatentImage "
                     f"to your checkpoint's resolution")
    return [line for line in lines if line]


def literal_prompt(text: str) -> str:
    """The prompt as ComfyUI's CLIPTextEncode reads it literally: it takes "(word)" and
    "(word:1.5)" as emphasis (a weighted embedding) unless the brackets are escaped as "\\(",
    "\\)"; schedsearch and diffusers encode brackets as plain text."""
    return text.replace("(", "\\(").replace(")", "\\)")


def _node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def _file_prefix(name: str) -> str:
    # SaveImage refuses paths outside the output folder; keep the name to safe characters.
    return "schedsearch/" + (re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "preset")


def workflow(preset, *, checkpoint: str = DEFAULT_CHECKPOINT, prompt: str = DEFAULT_PROMPT,
             negative: str = "", seed: int = 0, width: Optional[int] = None,
             height: Optional[int] = None) -> dict:
    """The preset as a ComfyUI API-format workflow (``json.dumps`` it for /prompt or the editor).

    ``checkpoint``: the file name as ComfyUI lists it under models/checkpoints.
    ``width``/``height``: pixels, default the family's native resolution. ``seed``: SamplerCustom's
    noise_seed; with one image it draws the same ε as schedsearch's seed. Raises ValueError for
    testbed presets and out-of-range values.
    """
    _check_family(preset)
    w, h = _resolution(preset, width, height)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2^64 − 1], got {seed!r}")
    seed = int(seed)
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise ValueError("checkpoint must name a file in ComfyUI's models/checkpoints")
    for name, text in (("prompt", prompt), ("negative", negative)):
        if not isinstance(text, str):   # None would reach ComfyUI as the prompt "None"
            raise ValueError(f"{name} must be a string, got {text!r}")
    sampler = comfy_sampler(preset)
    freeu, _ = freeu_mapping(preset.freeu)
    end = float(preset.sigmas[-1])
    # SDXL's unconditional branch is the zero embedding (and zero pooled output) when the
    # negative prompt is empty, as its diffusers pipeline (force_zeros_for_empty_prompt) and
    # schedsearch run it; CLIPTextEncode("") would encode the empty prompt instead
    zero_negative = preset.family == "sdxl" and negative == ""
    nodes = {
        "1": _node("CheckpointLoaderSimple", "Load checkpoint", ckpt_name=checkpoint),
        "2": _node("CLIPTextEncode", "Positive prompt", text=literal_prompt(prompt),
                   clip=["1", 1]),
        "3": _node("CLIPTextEncode", "Negative prompt", text=literal_prompt(negative),
                   clip=["1", 1]),
        "4": _node("EmptyLatentImage", "Empty latent", width=w, height=h, batch_size=1),
        "5": _node("ManualSigmas", f"σ schedule {preset.name} ({preset.steps} steps)",
                   sigmas=sigma_string(preset.sigmas)),
        "6": _node(sampler.node, f"Sampler for {preset.solver}", **sampler.inputs),
        "7": _node("SamplerCustom", f"SamplerCustom ({preset.nfe} NFE, ends at σ = {end:g})",
                   model=["10", 0] if freeu is not None else ["1", 0], add_noise=True,
                   noise_seed=seed, cfg=guidance(preset), positive=["2", 0],
                   negative=["11", 0] if zero_negative else ["3", 0],
                   sampler=["6", 0], sigmas=["5", 0], latent_image=["4", 0]),
        # output (0), the state at σ_end, is what schedsearch decodes; not denoised_output (1).
        "8": _node("VAEDecode", "Decode the final state", samples=["7", 0], vae=["1", 2]),
        "9": _node("SaveImage", "Save image", images=["8", 0],
                   filename_prefix=_file_prefix(preset.name)),
    }
    if freeu is not None:
        nodes["10"] = _node("FreeU", f"FreeU ({preset.freeu.variant} plan)", model=["1", 0],
                            **freeu)
    if zero_negative:
        nodes["11"] = _node("ConditioningZeroOut", "SDXL's unconditional branch: zeros",
                            conditioning=["3", 0])
    return nodes


def export(preset, **options) -> tuple[dict, list[str]]:
    """(the workflow, its caveat lines): what ``presets show --format comfy-workflow`` prints,
    the workflow as JSON on stdout and each line as a note. ``options``: those of ``workflow``."""
    return workflow(preset, **options), notes(preset, width=options.get("width"),
                                             height=options.get("height"))
