"""The exact flow testbed: ``gmm``'s Gaussian mixture under flow matching (``--model gmm-flow``).

The data are the same mixture, x0 ~ Σ_k π_k N(μ_k, v_k I); the model sees x_t = (1−t)·x0 + t·ε,
so p(x_t | k) = N((1−t)·μ_k, ((1−t)²·v_k + t²) I) and

    E[x0 | x_t, k] = μ_k + (1−t)·v_k/((1−t)²·v_k + t²) · (x_t − (1−t)·μ_k),

weighted by the component posteriors. This is written in t, so it holds at t = 1 exactly (every
component then looks alike: D is the prior mean of the class). For finite σ it is the same D as
``gmm``'s (y = x_t/(1−t) is a rescaling), at σ = ∞ it is the limit. The closed-form velocity is
v = (x_t − D)/t. The ground truth for solver and schedule tests on flow models.
"""

from __future__ import annotations

import torch

from ..noise import FLOW, FlowTable
from .flow import flow_input
from .gmm import GaussianMixture


class FlowGaussianMixture(GaussianMixture):
    family = "gmm-flow"

    def __init__(self, means, variances, weights, classes, table: FlowTable = FLOW,
                 device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__(means, variances, weights, classes, table=table, device=device,
                         dtype=dtype)
        self.name = self.name.replace("gmm-", "gmm-flow-", 1)

    def posterior_mean(self, x: torch.Tensor, sigma, class_ids: torch.Tensor) -> torch.Tensor:
        """E[x0 | y] for the VE state y at σ (∞ allowed: y is then ε)."""
        x_t, t = flow_input(x, sigma)
        return self.posterior_mean_t(x_t, t, class_ids)

    def posterior_mean_t(self, x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor
                         ) -> torch.Tensor:
        """E[x0 | x_t] at unit times t (B,), in the model's own variables."""
        t = t.to(x_t.device, x_t.dtype).reshape(-1, 1)
        a = 1 - t
        var = a.square() * self.variances[None, :] + t.square()                 # (B, K)
        diff = x_t[:, None, :] - a[:, :, None] * self.means[None]                 # (B, K, d)
        logp = self._class_log_weights[class_ids] - 0.5 * (
            diff.square().sum(-1) / var + self.latent_shape[0] * var.log())
        w = torch.softmax(logp, dim=-1)
        gain = (a * self.variances[None, :] / var)[..., None]                     # (B, K, 1)
        return torch.einsum("bk,bkd->bd", w, self.means[None] + gain * diff)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 guidance: float = 1.0) -> torch.Tensor:
        """The exact guided velocity E[ε − x0 | x_t] = (x_t − D)/t at unit times t > 0."""
        d_c = self.posterior_mean_t(x_t, t, cond)
        d = d_c
        if guidance != 1.0:
            d_u = self.posterior_mean_t(x_t, t, torch.full_like(cond, self.num_classes))
            d = d_u + guidance * (d_c - d_u)
        return (x_t - d) / t.to(x_t.dtype).reshape(-1, 1)
