"""Run a preset inside stock diffusers pipelines: ``PresetScheduler`` and ``freeu_plan``.

    import schedsearch
    from schedsearch.diffusers import PresetScheduler, freeu_plan
    preset = schedsearch.load_preset("sd15-5")
    pipe.scheduler = PresetScheduler.from_preset(preset, pipe.scheduler.config)
    with freeu_plan(pipe, preset):
        images = pipe(prompt, num_inference_steps=preset.nfe, guidance_scale=preset.guidance).images

The same two lines serve text-to-image, img2img (``strength`` starts the preset part-way down its σ
list), inpainting, ControlNet and IP-Adapter pipelines of SD1.x, SD2.x and SDXL: they only talk to
the scheduler through ``set_timesteps``/``scale_model_input``/``step``/``add_noise``.

How ``step`` stays equal to our own solvers. diffusers' multistep schedulers take integer timesteps
and keep their own copies of the solver arithmetic; a preset names one of *our* solver functions,
``solver(denoiser, x, sigmas, hook) -> x``, and that function must be the one that runs. The
scheduler converts each model output of the pipeline to the data prediction D (ε- or v-prediction,
the same arithmetic as ``schedsearch.models.unet``) and keeps the list of D's and the starting
sample. At every ``step`` it *replays* the solver on the whole σ list from that start with a
denoiser that hands back the stored D's in order and, at the first call it has no D for, stops by
raising a private exception carrying the x the solver wanted to evaluate: that x is the next sample
the pipeline must run the UNet on. After the last call the solver simply returns the final x.
Multistep history, UniPC's corrector, a last step to σ = 0, lower orders at the end all come from
the one solver implementation, so the pipeline and ``schedsearch.generate`` agree by construction:
bit for bit without guidance; with CFG to ~1e-6, because a pipeline mixes the two branches in ε
rather than in D (the same affine map, rounded differently). The price is O(steps²) cheap tensor
updates and no model calls: for 20 steps of an SD 64×64 latent, 10-20 ms in all on one CPU core
for the DPM++/Euler solvers and ~100 ms for UniPC (it solves for its coefficients every step),
against ~40 s for a single SD1.5 UNet call on that core. The model-call schedule (σ of every
call, and which FreeU step is in force at it) is read off a dry run of the solver on a 1-element
tensor, so a solver with two calls per step (Heun) works too, with ``num_inference_steps`` equal
to its NFE. A pipeline that edits the sample between
steps (inpainting with a 4-channel UNet pastes the known region back; a ``callback_on_step_end``
may return new latents) is honoured: at that call the replay writes the edited sample into the
tensor the solver handed to the model, so the solver continues from it with its history, as
diffusers' own multistep schedulers do. Solvers whose evaluation points depend on the model output
(adaptive step size) cannot be replayed and are stopped with an error.

Why ``schedsearch.generate`` stays a separate path. It is what the search, scoring and the CLI
measure with, and it promises more than a pipeline loop can: an image depends only on its prompt
and seed, never on its batch (the backend runs the UNet at a fixed ``eval_batch`` and encodes
prompts one at a time; a pipeline batches the whole prompt list, which moves results in the last
bits), prompt embeddings are cached across thousands of calls, model time and solver time are
measured apart, a non-finite model output stops a trial with the step and σ, and it runs the
models that have no pipeline at all (the digits and gmm testbeds). It also pays no replay. This
module is the way out to users' own pipelines; both paths call the same solver function and the
tests hold them equal.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from . import presets as _presets, solvers
from .freeu import restore, set_freeu, snapshot
from .noise import FlowTable, NoiseTable, flow_t, is_flow_config
from .presets import Preset, as_preset

__all__ = ["PresetScheduler", "PresetSchedulerOutput", "flow_euler_scheduler", "flow_euler_sigmas",
           "freeu_plan"]

# The scheduler-config keys that define the noise table (what NoiseTable.from_config reads).
_NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type")


@dataclass
class PresetSchedulerOutput(SchedulerOutput):
    """``prev_sample``: the next sample to evaluate (or the final one); ``pred_original_sample``:
    the data prediction D at the point just evaluated (guided), for previews."""

    pred_original_sample: Optional[torch.Tensor] = None


class _Need(BaseException):
    """The replay reached a model call it has no output for; ``x`` is where to evaluate next.

    A BaseException, so that a solver catching ``Exception`` around its arithmetic cannot swallow
    this control-flow signal."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def _trace(solve, sigmas: list[float]) -> tuple[list[float], list[int]]:
    """The σ of every model call the solver makes on this σ list, and for each call the FreeU step
    in force (our sampler applies plan step 0 first and step i+1 after step i's hook)."""
    calls: list[float] = []
    freeu_steps: list[int] = []
    current = [0]

    def denoiser(x, sigma):
        calls.append(float(sigma))
        freeu_steps.append(current[0])
        return torch.zeros_like(x)

    def hook(i, *_):
        current[0] = i + 1

    solve(denoiser, torch.zeros(1, 1, 1, 1), sigmas, hook)
    return calls, freeu_steps


def _as_preset(preset) -> Preset:
    if preset is None:
        raise ValueError("PresetScheduler needs a preset: build it with "
                         "PresetScheduler.from_preset(preset, pipe.scheduler.config)")
    return as_preset(preset, origin="PresetScheduler config")


_FLOW_TEXT_TO_IMAGE_ONLY = ("PresetScheduler runs flow presets in text-to-image SD3/FLUX "
                            "pipelines; img2img and inpainting (add_noise, scale_noise) are not "
                            "supported on flow models")


def _check_kind(preset: Preset, flow: bool) -> None:
    """A preset runs on the kind of pipeline it was made for (flow-matching vs DDPM)."""
    made_for = _presets.kind(preset)
    if made_for is not None and (made_for == "flow") != flow:
        raise ValueError(f"preset {preset.name} ({preset.family}) was made for a "
                         f"{'flow-matching' if made_for == 'flow' else 'DDPM-trained'} model; "
                         f"this pipeline's scheduler is "
                         f"{'a flow-matching one' if flow else 'a DDPM one'}")


def _check_flow_start(preset: Preset) -> None:
    """SD3/FLUX pipelines hand the model their unit noise draw at the first call, whatever its t
    (they never scale it by an init_noise_sigma), which is x_t = t·ε only at t = 1 (σ = ∞).
    ``generate`` (and ComfyUI) start at x_t = t₀·ε: a list from a finite σ₀ would run on another
    input in a pipeline, so it is refused rather than run differently."""
    s0 = float(preset.sigmas[0])
    if not math.isinf(s0):
        raise ValueError(f"preset {preset.name} starts at σ = {s0:g} (t = {s0 / (1 + s0):.4g}); "
                         f"SD3/FLUX pipelines start from pure noise at t = 1 (σ = ∞), so they "
                         f"cannot run it as made: run it with schedsearch.generate or in "
                         f"ComfyUI, or use a preset whose σ list starts at ∞")


def _flow_timesteps(calls: list[float], n: int) -> torch.Tensor:
    """1000·t of every call, float32, as the flow backend computes it (t in float64, then
    float32, times N in float32): SD3's transformer gets these, FLUX's these / 1000."""
    t = torch.tensor([flow_t(s) for s in calls], dtype=torch.float64)
    return t.float() * n


def flow_euler_sigmas(preset) -> list[float]:
    """For a flow preset with Euler (or DPM++1S: the same step) ending at σ = 0, the list to pass
    as ``pipe(..., sigmas=...)``: t = σ/(1+σ) of every model call (∞ → 1.0), without the final 0,
    which diffusers appends. With ``flow_euler_scheduler`` diffusers' own Euler then takes the
    preset's steps: no PresetScheduler is needed for these presets."""
    preset = _as_preset(preset)
    if solvers.canonical(preset.solver) not in ("euler", "dpmpp_1s") or float(preset.sigmas[-1]):
        raise ValueError(f"preset {preset.name}: FlowMatchEulerDiscreteScheduler runs Euler steps "
                         f"to σ = 0; this one is {preset.solver} ending at "
                         f"σ = {float(preset.sigmas[-1]):g}: use PresetScheduler")
    if _presets.kind(preset) == "ddpm":
        raise ValueError(f"preset {preset.name} was made for a DDPM-trained model")
    _check_flow_start(preset)
    return [float(flow_t(float(s))) for s in preset.sigmas[:-1]]


def flow_euler_scheduler(config):
    """The pipeline's FlowMatchEulerDiscreteScheduler with its shift turned off (shift 1, no
    dynamic shift, no terminal stretch), so ``sigmas=`` from ``flow_euler_sigmas`` run as given:
    diffusers shifts whatever sigmas it is handed."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # diffusers' class, on demand

    # use_flow_sigmas (a PresetScheduler config saved by an older version) would make
    # FluxPipeline drop the sigmas= this scheduler is for
    config = {k: v for k, v in dict(config).items() if k != "use_flow_sigmas"}
    return FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        invert_sigmas=False, stochastic_sampling=False)


def _pipeline_default(sigmas) -> bool:
    """The σ list FLUX pipelines (FluxPipeline, Kontext, img2img, ControlNet, Fill) pass to the
    scheduler when the user gives none: np.linspace(1, 1/n, n). Recognised so a user's own
    ``sigmas=`` is refused instead of silently dropped (what ``use_flow_sigmas`` would do)."""
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    n = len(s)
    return n > 0 and bool(np.array_equal(s, np.linspace(1.0, 1 / n, n)))


class PresetScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a schedsearch preset: its σ list and its solver.

    Build it with ``from_preset(preset, pipe.scheduler.config)``: the noise table (betas,
    prediction type) comes from the pipeline's scheduler config, and the preset's JSON is stored in
    this scheduler's config, so ``save_pretrained``/``from_pretrained`` round-trip it.
    ``num_inference_steps`` must be the preset's NFE (``scheduler.nfe``).
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, preset=None, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 trained_betas=None, prediction_type: str = "epsilon",
                 use_flow_sigmas: bool = False):
        self.preset = _as_preset(preset)
        # the config must hold JSON, whatever form the preset was handed in
        self.register_to_config(preset=self.preset.to_json())
        # prediction_type "flow": an SD3/FLUX pipeline (velocity out, x_t in, timestep 1000·t).
        # use_flow_sigmas is read by FluxPipeline (it then passes no sigmas=); kept so configs
        # saved with it load, never set: it would leak into a FlowMatchEulerDiscreteScheduler
        # built from this config (flow_euler_scheduler, a swap back) and make FluxPipeline drop
        # the sigmas= given to it
        self.flow = prediction_type == "flow"
        self.table = FlowTable(num_train_timesteps=num_train_timesteps) if self.flow else \
            NoiseTable.from_config(dict(
                num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas,
                prediction_type=prediction_type))
        _check_kind(self.preset, self.flow)
        if self.flow:
            _check_flow_start(self.preset)
        self._solve = solvers.get(self.preset.solver)
        self._sigma_list = [float(s) for s in self.preset.sigmas]
        self._calls, self.freeu_steps = _trace(self._solve, self._sigma_list)
        if len(self._calls) != self.preset.nfe:
            raise ValueError(f"solver {self.preset.solver} made {len(self._calls)} model calls on "
                             f"preset {self.preset.name}'s σ list, but the preset counts "
                             f"{self.preset.nfe}")
        # float32 σ and t(σ) of every call, computed as schedsearch.models.unet does, so the UNet
        # sees the same inputs through the pipeline as through our sampler
        self.sigmas = torch.tensor(self._calls + [self._sigma_list[-1]], dtype=torch.float32)
        self._timesteps = (_flow_timesteps(self._calls, self.table.num_train_timesteps)
                           if self.flow else self.table.sigma_to_t(self.sigmas[:-1].double()).float())
        self.timesteps = self._timesteps.clone()
        self.num_inference_steps = len(self._calls)
        self._reset()

    @classmethod
    def from_preset(cls, preset, config=None, **overrides) -> "PresetScheduler":
        """``preset``: a Preset, its JSON, or a preset name/path. ``config``: the pipeline's
        scheduler config (``pipe.scheduler.config``), read for the noise table only."""
        preset = _as_preset(preset)
        cfg = dict(config or {})
        if is_flow_config(cfg):   # the preset's explicit σ list replaces the shifted default
            scheduler = cls(preset=preset.to_json(), prediction_type="flow",
                            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                            **overrides)
        else:
            if cfg.get("rescale_betas_zero_snr", False):
                raise ValueError("the pipeline's scheduler rescales betas to zero terminal SNR, "
                                 "which puts σ_max at infinity; a σ-list preset cannot start there")
            kwargs = {k: cfg[k] for k in _NOISE_KEYS if k in cfg}
            if kwargs.get("trained_betas") is not None:
                kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
            kwargs.update(overrides)
            scheduler = cls(preset=preset.to_json(), **kwargs)
        # The pipeline's other settings (SDXL's "leading" spacing and steps offset, FLUX's shift)
        # ride along unused, as diffusers' from_config keeps a config's foreign keys, so that
        # `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` swaps the stock scheduler
        # back as it was, and save_pretrained writes them. Keys the config left at its class's
        # defaults stay out, as in diffusers.
        defaults = set(cfg.get("_use_default_values", ()))
        scheduler.register_to_config(**{
            k: v for k, v in cfg.items()
            if not k.startswith("_") and k not in defaults and k not in scheduler.config})
        return scheduler

    # -- what pipelines read --------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        return len(self._calls)

    @property
    def init_noise_sigma(self) -> float:
        # our sampler starts at x = σ_max·ε; a pipeline multiplies its unit draws by this (a
        # flow pipeline starts from the unit draws themselves: x_t at t = 1 is ε)
        return 1.0 if self.flow else self._sigma_list[0]

    @property
    def step_index(self) -> Optional[int]:
        """Index of the model call about to run (or just run, between step and the next call)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img/inpainting: the first model call the pipeline runs (from ``strength``)."""
        if not 0 <= int(begin_index) < self.nfe:
            raise ValueError(f"begin_index must be in [0, {self.nfe - 1}] for preset "
                             f"{self.preset.name} ({self.nfe} model calls), got {begin_index}; "
                             f"an img2img strength below 1/{self.nfe} runs none of them")
        self._begin_index = int(begin_index)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps=None, sigmas=None, **kwargs) -> None:
        """The preset's model calls. ``timesteps=``/``sigmas=`` are refused; anything else a
        pipeline passes for other schedulers (``mu=``, ...) is ignored."""
        name = self.preset.name
        if sigmas is not None and _pipeline_default(sigmas):
            # FLUX pipelines pass this linspace, of num_inference_steps, when the user gives none
            num_inference_steps, sigmas = num_inference_steps or len(sigmas), None
        if num_inference_steps is not None and int(num_inference_steps) != self.nfe:
            raise ValueError(f"preset {name} makes {self.nfe} model calls (NFE {self.nfe}): call "
                             f"the pipeline with num_inference_steps={self.nfe}, not "
                             f"{num_inference_steps}")
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"PresetScheduler runs preset {name}'s own σ list; do not pass "
                             f"timesteps= or sigmas= to the pipeline (make a preset of another σ "
                             f"list to run it)")
        self.timesteps = self._timesteps.to(device or "cpu", copy=True)
        self._reset()

    def _reset(self) -> None:
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._run: Optional[list[float]] = None     # the σ list the solver is replayed on
        self._run_calls: list[float] = []           # σ of each of its model calls
        self._x0: Optional[torch.Tensor] = None     # the run's starting sample, float32
        self._state: Optional[torch.Tensor] = None  # the sample handed out last, float32, private
        self._ds: list[torch.Tensor] = []           # D of each model call so far, float32
        self._edits: dict[int, torch.Tensor] = {}   # call → sample as the pipeline changed it
        self._handed: tuple = (None, None)          # the sample handed out last, its version

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """diffusers' rule: the matching call; the second of two equal timesteps (Heun's
        corrector and the next step share a σ) so a mid-list start skips no σ."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep).to(schedule.device, schedule.dtype)
        indices = (schedule == t).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(t)} is not one of preset {self.preset.name}'s "
                             f"timesteps {self.timesteps.tolist()}")
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x·c_in, c_in = 1/sqrt(σ²+1), at the current call. Pure: ControlNet's guess mode calls
        it twice per step."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.flow:   # a flow model takes x_t itself
            return sample
        s = self.sigmas[min(self._step_index, self.nfe - 1)].to(sample.device)
        return (sample.float() * (s.square() + 1).rsqrt()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """VE noising x0 + σ·noise at those timesteps' σ, with diffusers' index rules (before the
        first step: the begin index; after a step, as inpainting calls it: the next call)."""
        if self.flow:
            raise ValueError(_FLOW_TEXT_TO_IMAGE_ONLY)
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            idx = [self._step_index] * len(timesteps)
        else:
            idx = [self._begin_index] * len(timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        sigma = sigmas[idx].view(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma

    def scale_noise(self, sample: torch.Tensor, timestep, noise=None) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler's img2img noising, which SD3/FLUX img2img and
        inpainting pipelines call: not supported (refused with what is)."""
        raise ValueError(_FLOW_TEXT_TO_IMAGE_ONLY)

    # -- the step ---------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True, **kwargs):
        """Take the pipeline's (guided) model output at the current call and return the sample
        the solver evaluates next, or its final sample after the last call."""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self.nfe:
            raise RuntimeError(f"all {self.nfe} model calls of preset {self.preset.name} are "
                               f"done; call set_timesteps before sampling again")
        if self._run is None:
            self._start_run(k, sample)
        x = self._current(sample)
        if self.flow:   # D = x_t − t·v on the very x_t the model saw
            d = self._flow_data(model_output, sample, k)
        else:
            d = self._to_data(model_output, x, self.sigmas[k].to(x.device))
        self._ds.append(d)
        self._state = self._replay()
        self._step_index += 1
        prev = self._handout(self._state, self._step_index).to(sample.dtype, copy=True)
        self._handed = (prev, prev._version)   # in-place writes to it bump _version
        denoised = d.to(sample.dtype, copy=True)   # the caller may write to it; ours must not move
        if not return_dict:
            return prev, denoised
        return PresetSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _start_run(self, start: int, sample: torch.Tensor) -> None:
        """The solver runs on the σ list from the first call the pipeline makes: the whole list
        for text-to-image, its tail for img2img (a fresh start there, lower order first, as
        diffusers' multistep schedulers do)."""
        if start == 0:
            run = self._sigma_list
        else:
            sigma = self._calls[start]
            j = self._sigma_list.index(sigma) if sigma in self._sigma_list else None
            run = self._sigma_list[j:] if j is not None else []
            if j is None or _trace(self._solve, run)[0] != self._calls[start:]:
                raise ValueError(
                    f"the pipeline starts at model call {start} of preset {self.preset.name}, "
                    f"which is not the start of a {self.preset.solver} step (img2img/inpainting "
                    f"strength picks the start); choose another strength")
        self._run, self._run_calls = run, self._calls[start:]
        self._x0 = self._from_pipeline(sample.detach().float().clone(), start)
        self._state, self._ds, self._edits = self._x0, [], {}

    def _current(self, sample: torch.Tensor) -> torch.Tensor:
        """The float32 sample the model was just evaluated at: our own copy, unless the pipeline
        changed the sample since we handed it out; then its sample, kept for every later replay."""
        j = len(self._ds)
        if j == 0 or (sample is self._handed[0] and sample._version == self._handed[1]):
            return self._state   # the tensor we handed out, untouched: known without a device sync
        k = self._step_index
        mine = self._handout(self._state, k)
        if mine.shape == sample.shape and torch.equal(mine.to(sample.device, sample.dtype), sample):
            return self._state
        edited = self._from_pipeline(sample.detach().float().clone(), k)
        self._edits[j] = edited
        return edited

    # -- flow pipelines: the sample is x_t, the solver state y = x_t/(1−t) -----------------------
    def _scale(self, k: int) -> torch.Tensor:
        """1 − t at call k as ``models.flow.flow_input`` computes it (float64, then float32), so
        the x_t handed to the model is bit for bit the one our sampler feeds it; 1 at σ = ∞."""
        s = self._calls[k]
        return torch.tensor(1.0 if math.isinf(s) else 1 - flow_t(s), dtype=torch.float32)

    def _handout(self, y: torch.Tensor, k: int) -> torch.Tensor:
        """What the pipeline gets for call k: x_t = y·(1−t) on a flow model; after the last call
        the final y itself (x0 at σ = 0, else x0 + σ_N·ε: what ``generate`` decodes)."""
        if not self.flow or k >= len(self._calls):
            return y
        return y * self._scale(k).to(y.device)

    def _from_pipeline(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The solver state for a sample the pipeline holds at call k: y = x_t/(1−t) on a flow
        model (x_t = ε at σ = ∞ is already the state there), the sample itself otherwise."""
        return x / self._scale(k).to(x.device) if self.flow else x

    def _flow_data(self, model_output: torch.Tensor, sample: torch.Tensor, k: int
                   ) -> torch.Tensor:
        """D = x_t − t·v with ``models.flow.flow_denoised``'s float32 arithmetic (CFG commutes
        with it: D is affine in v with the same x_t for both branches)."""
        t = torch.tensor(flow_t(self._calls[k]), dtype=torch.float64).float().to(sample.device)
        return sample.float() - t * model_output.float()

    def _to_data(self, model_output: torch.Tensor, x: torch.Tensor, s: torch.Tensor
                 ) -> torch.Tensor:
        """D from ε or v, with schedsearch.models.unet's float32 arithmetic (CFG commutes with it:
        D is affine in the model output with the same x for both branches)."""
        out = model_output.float()
        if self.table.prediction_type == "v_prediction":
            return x / (s.square() + 1) - out * s * (s.square() + 1).rsqrt()
        return x - s * out

    def _replay(self) -> torch.Tensor:
        """Run the solver from the run's start on the stored D's; the x where it first needs a D
        we do not have (or its final x). O(calls so far) tensor updates, no model call."""
        ds, edits, expected = self._ds, self._edits, self._run_calls
        n = [0]

        def denoiser(x, sigma):
            i = n[0]
            if i >= len(expected) or float(sigma) != expected[i]:
                raise RuntimeError(
                    f"solver {self.preset.solver} asked for σ = {float(sigma)} at call {i}, off "
                    f"the calls of its dry run {expected}; a solver whose evaluation points "
                    f"depend on the model output cannot run as a scheduler")
            if i == len(ds):
                raise _Need(x)
            if i in edits:
                x.copy_(edits[i])   # the pipeline moved the sample: the solver continues from it
            n[0] += 1
            return ds[i].clone()    # a solver may update D in place; the stored one must survive

        try:
            return self._solve(denoiser, self._x0.clone(), self._run, None)
        except _Need as need:
            return need.x


# -- FreeU plans in pipelines ---------------------------------------------------------------------

def _call_index(scheduler, count: dict) -> int:
    """The model call about to run: the scheduler's step index (absolute, so img2img's later
    start is right), else a count of UNet calls in this run, from its begin index (a multistep
    scheduler sets its step index in its first step; DDIM has none). A run starts with
    ``set_timesteps``, which makes a new ``timesteps`` tensor: that resets the count, so a second
    pipeline call in the same block counts from its own start."""
    k = getattr(scheduler, "step_index", None)
    if isinstance(k, int):
        return k
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is not count.get("timesteps"):
        begin = getattr(scheduler, "begin_index", None)
        count.update(timesteps=timesteps, next=begin if isinstance(begin, int) else 0)
    count["next"] += 1
    return count["next"] - 1


@contextlib.contextmanager
def freeu_plan(pipe, preset):
    """Make ``pipe`` follow the preset's per-step FreeU plan (either variant) inside the block.

    A forward pre-hook on the UNet sets, right before every UNet call, the setting of the preset
    step that call belongs to (read from the scheduler's step index), so the first call is right
    even when img2img starts part-way down the σ list, and no callback is needed: pass your own
    ``callback_on_step_end`` to the pipeline as usual. On exit — also when the pipeline raises —
    the hook is removed and the UNet's FreeU state is put back as it was found.
    """
    preset = _as_preset(preset)
    plan = preset.freeu if preset.freeu is not None and preset.freeu.active else None
    unet = getattr(pipe, "unet", None)
    if plan is not None and unet is None:
        raise ValueError(f"{type(pipe).__name__} has no UNet; FreeU acts on a UNet")
    scheduler = getattr(pipe, "scheduler", None)
    if isinstance(scheduler, PresetScheduler) and (
            scheduler.preset.solver, scheduler.preset.sigmas.tolist()) != (
            preset.solver, preset.sigmas.tolist()):
        raise ValueError(f"pipe.scheduler runs preset {scheduler.preset.name}, not "
                         f"{preset.name}: the FreeU plan would follow the wrong steps")
    if plan is None:
        yield
        return
    steps = _trace(solvers.get(preset.solver), [float(s) for s in preset.sigmas])[1]
    count: dict = {}

    def before_call(module, args):
        k = _call_index(pipe.scheduler, count)
        set_freeu(unet, plan.at(steps[min(k, len(steps) - 1)]), plan.variant)

    found = snapshot(unet)
    handle = unet.register_forward_pre_hook(before_call)
    try:
        yield
    finally:
        handle.remove()
        restore(unet, found)
