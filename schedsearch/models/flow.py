"""What every flow-matching backend shares: the VE state y ↔ the model's x_t, and D from v.

A flow model predicts v = ε − x0 at x_t = (1−t)·x0 + t·ε. The solvers carry y = x_t/(1−t) at
σ = t/(1−t) (see docs/flow.md), so a backend's denoise takes (y, σ), feeds the network
x_t = y/(1+σ) at timestep N·t, and returns D = x_t − t·v. At σ = ∞ the solver state is ε, which
is x_t at t = 1 exactly, so the first model call sees t = 1 and the noise itself.
"""

from __future__ import annotations

import torch

from ..noise import flow_t


def flow_input(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): the model input for the VE state ``x`` at σ (a float or a per-image (B,) tensor,
    ∞ allowed), and the unit time t per image as a (B,) tensor on x's device (float64 for a float64
    state, else float32)."""
    b = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).cpu()
    if sig.numel() == 1:
        sig = sig.expand(b)
    if sig.numel() != b:
        raise ValueError(f"σ must be one value or one per image, got {sig.numel()} for {b} images")
    if bool((sig < 0).any()) or bool(torch.isnan(sig).any()):
        raise ValueError("σ must be >= 0")
    t = flow_t(sig)
    # 1 − t = 1/(1+σ) scales y to x_t; at σ = ∞ the state is already ε = x_t (scale 1)
    scale = torch.where(torch.isinf(sig), torch.ones_like(sig), 1 - t)
    view = (-1,) + (1,) * (x.ndim - 1)
    x_t = x * scale.to(x.device, x.dtype).view(view)
    return x_t, t.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)


def flow_denoised(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """D = x_t − t·v, in x_t's dtype (the solver state's)."""
    view = (-1,) + (1,) * (x_t.ndim - 1)
    return x_t - t.to(x_t.dtype).view(view) * v.to(x_t.dtype)


def guided(d: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG on denoised values of a [uncond; cond] batch: D_u + w·(D_c − D_u)."""
    d_u, d_c = d.chunk(2)
    return torch.lerp(d_u, d_c, float(guidance))
