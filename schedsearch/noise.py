"""The discrete noise table of a DDPM-trained model, seen through VE σ (see docs/conventions.md).

Every schedule in schedsearch is a list of σ; models are conditioned on the fractional DDPM
timestep t. This module is the one place where the two meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SD_KEY = ("scaled_linear", 0.00085, 0.012, 1000)


def _betas(schedule: str, beta_start: float, beta_end: float, steps: int) -> np.ndarray:
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
        return cls.from_betas(
            cfg.get("beta_schedule", "scaled_linear"),
            float(cfg.get("beta_start", 0.00085)),
            float(cfg.get("beta_end", 0.012)),
            int(cfg.get("num_train_timesteps", 1000)),
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
