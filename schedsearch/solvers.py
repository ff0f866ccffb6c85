"""ODE solvers on σ in data-prediction form (SPEC §3), in the style of k-diffusion.

Every solver is ``solver(denoiser, x, sigmas, hook=None) -> x`` where ``denoiser(x, sigma)`` returns
the denoised estimate D(x; σ) for a Python float σ. ``hook(i, sigma, sigma_next, x, denoised)`` is
called once per step, right after the step's first model call and before x moves; it is how callers
toggle FreeU for the next call, record trajectories, or stop on non-finite values (by raising).

Per-step coefficients are computed once as Python floats, so a step costs one fused tensor
update on top of the model call.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class Hook(Protocol):
    def __call__(self, i: int, sigma: float, sigma_next: float, x: torch.Tensor,
                 denoised: torch.Tensor) -> None: ...


class NonFiniteError(FloatingPointError):
    """A sample became NaN or infinite; the message says at which step and noise level."""


def check_finite(i: int, sigma: float, sigma_next: float, x: torch.Tensor,
                 denoised: torch.Tensor) -> None:
    """A hook that stops sampling at the first non-finite model output."""
    if not bool(torch.isfinite(denoised).all()):
        raise NonFiniteError(
            f"the model returned non-finite values at step {i} (sigma = {sigma:.5g}); "
            "this candidate diverges")


def chain(*hooks: Optional[Hook]) -> Optional[Hook]:
    """One hook that calls several in order (None entries are skipped)."""
    live = [h for h in hooks if h is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def hook(i, sigma, sigma_next, x, denoised):
        for h in live:
            h(i, sigma, sigma_next, x, denoised)
    return hook


def _floats(sigmas) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


@torch.no_grad()
def dpmpp_1s(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
             ) -> torch.Tensor:
    """First-order DPM-Solver++ (= DDIM): x ← q·x + (1−q)·D, q = σ_{i+1}/σ_i."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        d = denoiser(x, s[i])
        if hook is not None:
            hook(i, s[i], s[i + 1], x, d)
        x = torch.lerp(d, x, s[i + 1] / s[i])
    return x


@torch.no_grad()
def dpmpp_2m(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
             ) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous D, one model call per step.

    The first step, and a final step to σ = 0, are first order.
    """
    s = _floats(sigmas)
    d_prev, h_prev = None, None
    for i in range(len(s) - 1):
        d = denoiser(x, s[i])
        if hook is not None:
            hook(i, s[i], s[i + 1], x, d)
        if s[i + 1] == 0:
            x = d
            continue
        h = math.log(s[i] / s[i + 1])
        if d_prev is None:
            x = torch.lerp(d, x, s[i + 1] / s[i])
        else:
            c = h / (2 * h_prev)  # 1/(2r) with r = h_prev/h
            x = torch.lerp(torch.lerp(d, d_prev, -c), x, s[i + 1] / s[i])
        d_prev, h_prev = d, h
    return x


@torch.no_grad()
def euler(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x − D)/σ (k-diffusion / diffusers arithmetic)."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        d = denoiser(x, s[i])
        if hook is not None:
            hook(i, s[i], s[i + 1], x, d)
        x = x + (x - d) / s[i] * (s[i + 1] - s[i])
    return x


@torch.no_grad()
def heun(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None) -> torch.Tensor:
    """Heun's method (Karras et al. Alg. 1, no churn): 2 model calls per step, 1 for a step to 0."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        d = denoiser(x, s[i])
        if hook is not None:
            hook(i, s[i], s[i + 1], x, d)
        slope = (x - d) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + slope * dt
            continue
        x2 = x + slope * dt
        slope2 = (x2 - denoiser(x2, s[i + 1])) / s[i + 1]
        x = x + (slope + slope2) * (dt / 2)
    return x


SOLVERS = {"dpmpp_1s": dpmpp_1s, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}
_ALIASES = {"dpm++1s": "dpmpp_1s", "dpm++2m": "dpmpp_2m", "ddim": "dpmpp_1s", "1s": "dpmpp_1s",
            "2m": "dpmpp_2m"}


def canonical(name: str) -> str:
    """'DPM++2M', 'dpmpp_2m', '2m' → 'dpmpp_2m'."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} (or DPM++1S / DPM++2M), "
                         f"got {name!r}")
    return key


def get(name: str):
    return SOLVERS[canonical(name)]


def model_calls(solver: str, sigmas) -> int:
    """Model calls (NFE per image) a solver spends on a σ list."""
    s = _floats(sigmas)
    steps = len(s) - 1
    if canonical(solver) == "heun":
        return 2 * steps - int(s[-1] == 0)
    return steps
