"""Noise tables seen through VE σ: the discrete table of a DDPM-trained model (see
docs/conventions.md) and the continuous time of a flow-matching model (see docs/flow.md).

Every schedule in schedsearch is a list of σ; models are conditioned on a timestep t (the fractional
DDPM index, or 1000·t for flow models). This module is the one place where the two meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SD_KEY = ("scaled_linear", 0.00085, 0.012, 1000)


def _number(cfg: Mapping[str, Any], key: str, default: float) -> float:
    """A scheduler config's number, refused by its key when it is none."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


MAX_TRAIN_TIMESTEPS = 100_000   # trained models use 1000


def _betas(schedule: str, beta_start: float, beta_end: float, steps: int) -> np.ndarray:
    if not 2 <= steps <= MAX_TRAIN_TIMESTEPS:   # a table of 10¹² steps would only run out of memory
        raise ValueError(f"num_train_timesteps must be in [2, {MAX_TRAIN_TIMESTEPS}], got {steps}")
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    if schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    raise ValueError(
        f"beta_schedule must be 'scaled_linear', 'linear' or 'squaredcos_cap_v2', got {schedule!r}"
    )


@dataclass(frozen=True, eq=False)
class NoiseTable:
    """ᾱ_j and σ_j = sqrt((1−ᾱ_j)/ᾱ_j) for j = 0..T−1, in float64.

    σ→t interpolates the index against log σ (k-diffusion's ``sigma_to_t``, what the UNet is fed);
    t→σ interpolates ᾱ linearly (what the paper's code uses to place its t-grid).
    """

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    name: str = "custom"
    kind: ClassVar[str] = "ddpm"   # "flow" for FlowTable; what callers branch on

    def __post_init__(self) -> None:
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or len(ac) < 2 or not np.all((ac > 0) & (ac < 1)):
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1)")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        object.__setattr__(self, "alphas_cumprod", ac)
        sig = np.sqrt((1 - ac) / ac)
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "_log_sigmas", np.log(sig))
        object.__setattr__(self, "_log_sigmas_t", torch.from_numpy(np.log(sig)))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def sd(cls, prediction_type: str = "epsilon") -> "NoiseTable":
        """The Stable Diffusion table (SD1.x, SD2.x, SDXL): scaled_linear 0.00085 → 0.012, 1000 steps."""
        return cls.from_betas(*_SD_KEY, prediction_type)

    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        name: str | None = None,
    ) -> "NoiseTable":
        betas = _betas(beta_schedule, beta_start, beta_end, int(num_train_timesteps))
        key = (beta_schedule, float(beta_start), float(beta_end), int(num_train_timesteps))
        if name is None:
            name = "sd" if key == _SD_KEY else ":".join(map(str, key))
        return cls(np.cumprod(1.0 - betas), prediction_type, name)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseTable":
        """From a diffusers scheduler config (a dict or a ``scheduler.config``)."""
        cfg = dict(config)
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
            return cls(np.cumprod(1 - betas), cfg.get("prediction_type", "epsilon"), "trained_betas")
        betas = {key: _number(cfg, key, default)
                 for key, default in (("beta_start", 0.00085), ("beta_end", 0.012))}
        for key, value in betas.items():   # a β is a variance increment: in (0, 1)
            if not 0 < value < 1:
                raise ValueError(f"{key} must be in (0, 1), got {value!r}")
        steps = _number(cfg, "num_train_timesteps", 1000)
        if steps != int(steps):
            raise ValueError(f"num_train_timesteps must be an integer, got {steps!r}")
        return cls.from_betas(
            cfg.get("beta_schedule", "scaled_linear"), betas["beta_start"], betas["beta_end"],
            int(steps),
            cfg.get("prediction_type", "epsilon"),
        )

    # -- facts ---------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def t_max(self) -> float:
        return float(self.num_timesteps - 1)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def fingerprint(self) -> str:
        return f"{self.name}/{self.prediction_type}/{self.num_timesteps}"

    # -- conversions ---------------------------------------------------------------------------
    def sigma_to_t(self, sigma):
        """Fractional timestep by piecewise-linear interpolation of the index against log σ.

        Accepts a float, a numpy array or a tensor and returns the same kind (tensors keep their
        device; the arithmetic is float64 on CPU or the tensor's own dtype on an accelerator).
        """
        if isinstance(sigma, torch.Tensor):
            return self._sigma_to_t_torch(sigma)
        t = np.interp(np.log(np.asarray(sigma, dtype=np.float64)), self._log_sigmas,
                      np.arange(self.num_timesteps, dtype=np.float64))
        return float(t) if np.ndim(t) == 0 else t

    def _sigma_to_t_torch(self, sigma: torch.Tensor) -> torch.Tensor:
        ls = self._log_sigmas_t.to(sigma.device, torch.float64 if sigma.device.type == "cpu"
                                   else torch.float32)
        log_sigma = sigma.to(ls.dtype).log().reshape(-1)
        low = torch.searchsorted(ls, log_sigma, right=True).sub_(1).clamp_(0, len(ls) - 2)
        lo, hi = ls[low], ls[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp_(0, 1)
        return (low.to(ls.dtype) + w).reshape(sigma.shape)

    def t_to_sigma(self, t):
        """σ at fractional timestep t, interpolating ᾱ linearly between floor(t) and ceil(t)."""
        tt = np.asarray(t, dtype=np.float64)
        if np.any(~np.isfinite(tt)) or np.any(tt < 0) or np.any(tt > self.t_max):
            raise ValueError(f"t must lie in [0, {self.t_max:g}], got {t!r}")
        lo = np.floor(tt).astype(np.int64)
        hi = np.minimum(lo + 1, self.num_timesteps - 1)
        f = tt - lo
        ac = self.alphas_cumprod[lo] * (1 - f) + self.alphas_cumprod[hi] * f
        s = np.sqrt((1 - ac) / ac)
        return float(s) if s.ndim == 0 else s


SD = NoiseTable.sd()


# -- flow matching ---------------------------------------------------------------------------------
# A flow model sees x_t = (1−t)·x0 + t·ε, t ∈ [0, 1]. In y = x_t/(1−t), σ = t/(1−t) this is the VE
# form y = x0 + σ·ε, so every solver applies unchanged; t = 1 (pure noise) is σ = ∞.
FLOW_TIME_SHIFTS = ("exponential", "linear")
FLOW_GRIDS = ("scheduler", "flux")
_FLOW_REFUSED = ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas")


def is_flow_config(cfg: Mapping[str, Any]) -> bool:
    """A flow-matching pipeline's scheduler config (``FlowMatch*Scheduler``: a shift, no betas)."""
    return str(cfg.get("_class_name", "")).startswith("FlowMatch") or (
        "use_dynamic_shifting" in cfg and "beta_start" not in cfg) or \
        cfg.get("prediction_type") == "flow"


def flow_t(sigma):
    """t = σ/(1+σ) for σ in [0, ∞] (σ = ∞ gives t = 1 exactly); floats, arrays or tensors."""
    if isinstance(sigma, torch.Tensor):
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    s = np.asarray(sigma, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        t = np.where(np.isinf(s), 1.0, s / (1 + s))
    return float(t) if t.ndim == 0 else t


def flow_sigma(t):
    """σ = t/(1−t) for t in [0, 1] (t = 1 gives σ = ∞ exactly)."""
    tt = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s = np.where(tt >= 1, math.inf, tt / np.maximum(1 - tt, 0.0))
    return float(s) if s.ndim == 0 else s


def calculate_shift(image_seq_len: float, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent μ: linear in the number of latent tokens (diffusers'
    ``calculate_shift`` in its FLUX and SD3 pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


@dataclass(frozen=True, eq=False)
class FlowTable:
    """A flow-matching model's noise convention (diffusers' ``FlowMatchEulerDiscreteScheduler``).

    The model is fed ``num_train_timesteps``·t (σ→t is exact, no table to interpolate).
    ``shift`` is the time shift of the model's default schedule, t ↦ s·t/(1 + (s−1)·t): SD3's
    fixed shift 3, or FLUX's dynamic one, e^μ (exponential) or μ (linear) — the same map, so one
    number holds both; ``mu`` is kept for provenance. ``grid`` says which unshifted t-grid the
    model's pipeline starts from: "scheduler" (``set_timesteps(n)``: linspace from 1 to the
    scheduler's lowest t) or "flux" (FluxPipeline: linspace(1, 1/n, n)). ``sigma_max`` is ∞.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    mu: Optional[float] = None
    dynamic: bool = False
    grid: str = "scheduler"
    shift_terminal: Optional[float] = None
    name: str = ""
    kind: ClassVar[str] = "flow"
    prediction_type: ClassVar[str] = "flow"   # v = ε − x0; D = x_t − t·v

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps!r}")
        if self.grid not in FLOW_GRIDS:
            raise ValueError(f"grid must be one of {FLOW_GRIDS}, got {self.grid!r}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {self.shift_terminal!r}")
        if not self.name:
            tag = f"mu{self.mu:g}" if self.mu is not None else f"shift{self.shift:g}"
            extra = "" if self.grid == "scheduler" else f"-{self.grid}"
            end = "" if self.shift_terminal is None else f"-end{self.shift_terminal:g}"
            object.__setattr__(self, "name", f"flow-{tag}{extra}{end}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, image_seq_len: Optional[int] = None,
                    mu: Optional[float] = None, grid: str = "scheduler") -> "FlowTable":
        """From a ``FlowMatchEulerDiscreteScheduler`` config. A dynamic shift needs ``mu`` or the
        number of latent tokens ``image_seq_len`` (μ then follows ``calculate_shift``)."""
        cfg = dict(config)
        bad = [k for k in _FLOW_REFUSED if cfg.get(k)]
        if bad:
            raise ValueError(f"the flow scheduler config sets {', '.join(bad)}; schedsearch reads "
                             f"only the plain shifted flow schedule (set them to false)")
        kind = cfg.get("time_shift_type", "exponential")
        if kind not in FLOW_TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {FLOW_TIME_SHIFTS}, got {kind!r}")
        n = int(cfg.get("num_train_timesteps", 1000))
        terminal = cfg.get("shift_terminal") or None
        if not cfg.get("use_dynamic_shifting", False):
            return cls(n, _number(cfg, "shift", 1.0), None, False, grid, terminal)
        if mu is None:
            if image_seq_len is None:
                raise ValueError("a dynamically shifted flow model needs mu or image_seq_len")
            mu = calculate_shift(image_seq_len, int(cfg.get("base_image_seq_len", 256)),
                                 int(cfg.get("max_image_seq_len", 4096)),
                                 _number(cfg, "base_shift", 0.5),
                                 _number(cfg, "max_shift", 1.15))
        shift = math.exp(mu) if kind == "exponential" else float(mu)
        return cls(n, shift, float(mu), True, grid, terminal)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return int(self.num_train_timesteps)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    @property
    def sigma_min(self) -> float:
        """σ of the lowest training time 1/N after the shift (the scheduler's own ``sigma_min``)."""
        return flow_sigma(float(self.shifted(1.0 / self.num_train_timesteps)))

    @property
    def sigma_max(self) -> float:
        return math.inf

    def fingerprint(self) -> str:
        return f"{self.name}/{self.prediction_type}/{self.num_timesteps}"

    # -- the time shift and the model's own grid -----------------------------------------------
    def shifted(self, t):
        """The time shift s·t/(1 + (s−1)·t) of unit times, in float64."""
        t = np.asarray(t, dtype=np.float64)
        s = self.shift * t / (1 + (self.shift - 1) * t)
        return float(s) if s.ndim == 0 else s

    def grid_t(self, steps: int) -> np.ndarray:
        """The unshifted unit t-grid of the model's pipeline: ``steps`` times from 1 down."""
        if self.grid == "flux":
            return np.linspace(1.0, 1.0 / steps, steps)
        lowest = 1.0 / self.num_train_timesteps
        if not self.dynamic:  # the scheduler stores its times already shifted once
            lowest = float(self.shifted(lowest))
        return np.linspace(1.0, lowest, steps)

    def default_t(self, steps: int) -> np.ndarray:
        """The shifted unit t of the model's default schedule (without the final 0), as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` computes it."""
        t = np.atleast_1d(self.shifted(self.grid_t(steps)))
        if self.shift_terminal is not None and len(t) > 1:  # (diffusers: NaN for one step)
            t = 1 - (1 - t) / ((1 - t[-1]) / (1 - self.shift_terminal))
        return t

    # -- conversions ---------------------------------------------------------------------------
    def sigma_to_t(self, sigma):
        """The model's timestep N·σ/(1+σ) (σ = ∞ → N); floats, arrays or tensors."""
        if isinstance(sigma, torch.Tensor):
            if bool((sigma < 0).any()) or bool(torch.isnan(sigma).any()):
                raise ValueError("σ must be >= 0")
            return flow_t(sigma) * self.num_train_timesteps
        s = np.asarray(sigma, dtype=np.float64)
        if np.any(np.isnan(s)) or np.any(s < 0):
            raise ValueError(f"σ must be >= 0, got {sigma!r}")
        t = np.asarray(flow_t(s)) * self.num_train_timesteps
        return float(t) if t.ndim == 0 else t

    def t_to_sigma(self, t):
        """σ at model timestep t ∈ [0, N] (t = N → σ = ∞)."""
        tt = np.asarray(t, dtype=np.float64)
        if np.any(~np.isfinite(tt)) or np.any(tt < 0) or np.any(tt > self.t_max):
            raise ValueError(f"t must lie in [0, {self.t_max:g}], got {t!r}")
        return flow_sigma(tt / self.num_train_timesteps)


FLOW = FlowTable()
"""Plain rectified flow (shift 1): the built-in flow testbeds' table."""
