"""A diffusers ``UNet2DConditionModel`` seen as a denoiser D(x; σ) with classifier-free guidance.

Shared by the Stable Diffusion backend and the built-in ``digits`` testbed (see
docs/conventions.md): the input is scaled by c_in = 1/sqrt(σ²+1), the UNet gets the fractional
timestep t(σ) (log-σ interpolation), and CFG runs as one batched call on [uncond; cond], which
counts as one model call (NFE).
The solver state stays in float32 whatever the UNet's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..noise import NoiseTable


@dataclass
class Conditioning:
    """Per-image conditioning of a batch: encoder states (B, L, C) for cond and uncond, and the
    SDXL extras (``text_embeds``, ``time_ids``) when the UNet wants them."""

    cond: torch.Tensor
    uncond: torch.Tensor
    added: Optional[dict] = None
    uncond_added: Optional[dict] = None
    _both: Optional[tuple] = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.cond.shape[0]

    def for_call(self, guided: bool):
        """(encoder_hidden_states, added_cond_kwargs), concatenated once per batch, not per step."""
        if not guided:
            return self.cond, self.added
        if self._both is None:
            both_added = None
            if self.added is not None:
                both_added = {k: torch.cat([self.uncond_added[k], v]) for k, v in self.added.items()}
            self._both = (torch.cat([self.uncond, self.cond]), both_added)
        return self._both


def unet_denoise(unet, table: NoiseTable, x: torch.Tensor, sigma, cond: Conditioning,
                 guidance: float) -> torch.Tensor:
    """D(x; σ) with CFG ``D_u + w (D_c − D_u)``; σ is a float or a per-image (B,) tensor."""
    b = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sig.numel() == 1:
        sig = sig.expand(b)
    c_in = (sig.square() + 1).rsqrt().view(-1, *([1] * (x.ndim - 1)))
    t = table.sigma_to_t(sig.double() if sig.device.type == "cpu" else sig).float()
    guided = guidance != 1.0
    states, added = cond.for_call(guided)
    x_in = (x * c_in).to(unet.dtype)
    if guided:
        x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
    out = unet(x_in, t, encoder_hidden_states=states, added_cond_kwargs=added,
               return_dict=False)[0].float()
    xx = torch.cat([x, x]) if guided else x
    s = (torch.cat([sig, sig]) if guided else sig).view(-1, *([1] * (x.ndim - 1)))
    if table.prediction_type == "v_prediction":
        d = xx / (s.square() + 1) - out * s * (s.square() + 1).rsqrt()
    else:
        d = xx - s * out
    if not guided:
        return d
    d_u, d_c = d.chunk(2)
    return torch.lerp(d_u, d_c, float(guidance))
