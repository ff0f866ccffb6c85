"""An exact testbed: a Gaussian mixture whose denoiser is the closed-form posterior mean.

Data x0 ~ Σ_k π_k N(μ_k, v_k I) in d dimensions, noised as x = x0 + σ ε under any noise table.
Then p(x | k) = N(μ_k, (v_k + σ²) I) and E[x0 | x] = Σ_k w_k(x) (μ_k + v_k/(v_k + σ²)(x − μ_k)),
with w_k the component posteriors. Components belong to classes, so class conditioning and
classifier-free guidance work as with a real model, and the data distribution can be sampled
exactly. The ground truth for solver, schedule and OSS tests.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

from ..noise import SD, NoiseTable


class GaussianMixture:
    family = "gmm"
    unet = None  # FreeU does not apply

    def __init__(self, means, variances, weights, classes, table: NoiseTable = SD,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("means must be a (components, dim) array")
        k = means.shape[0]
        variances = torch.as_tensor(np.asarray(variances), dtype=torch.float64).reshape(-1)
        weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64).reshape(-1)
        classes = torch.as_tensor(np.asarray(classes), dtype=torch.long).reshape(-1)
        if not (len(variances) == len(weights) == len(classes) == k):
            raise ValueError("means, variances, weights and classes must have one entry per component")
        if not bool((variances > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("variances and weights must be > 0")
        self.num_classes = int(classes.max()) + 1
        self.table = table
        self.device, self.dtype = torch.device(device), dtype
        self.latent_shape = (means.shape[1],)
        self.name = f"gmm-d{means.shape[1]}-k{k}"
        self._host = dict(means=means, variances=variances, weights=weights / weights.sum(),
                          classes=classes)
        self._to(self.device, dtype)

    def _to(self, device, dtype):
        h = self._host
        self.means = h["means"].to(device, dtype)
        self.variances = h["variances"].to(device, dtype)
        self.log_weights = h["weights"].log().to(device, dtype)
        self.classes = h["classes"].to(device)
        # one row per class, plus the last row = unconditional: log π_k or −inf when k ∉ class
        masks = torch.full((self.num_classes + 1, len(h["weights"])), -math.inf, dtype=torch.float64)
        for c in range(self.num_classes):
            sel = h["classes"] == c
            masks[c, sel] = (h["weights"][sel] / h["weights"][sel].sum()).log()
        masks[-1] = h["weights"].log()
        self._class_log_weights = masks.to(device, dtype)

    @classmethod
    def default(cls, dim: int = 16, num_classes: int = 4, per_class: int = 3, seed: int = 0,
                **kwargs) -> "GaussianMixture":
        """A seeded mixture at the scale of image data in [-1, 1]: means in a ball of radius ~1,
        component standard deviations between 0.05 and 0.3."""
        g = np.random.default_rng(seed)
        k = num_classes * per_class
        means = np.tanh(g.normal(size=(k, dim)))
        stds = g.uniform(0.05, 0.3, size=k)
        weights = g.uniform(0.5, 1.5, size=k)
        return cls(means, stds**2, weights, np.repeat(np.arange(num_classes), per_class), **kwargs)

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self._to(self.device, self.dtype)
        return self

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key in ("means", "variances", "weights", "classes"):
            h.update(self._host[key].numpy().tobytes())
        h.update(self.table.fingerprint().encode())
        return f"{self.name}-{h.hexdigest()[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "fingerprint": self.fingerprint(),
                "device": str(self.device), "dtype": str(self.dtype),
                "latent_shape": list(self.latent_shape), "noise_table": self.table.fingerprint(),
                "classes": self.num_classes}

    # -- conditioning ---------------------------------------------------------------------------
    def condition(self, prompts: Sequence) -> torch.Tensor:
        """Class ids for a batch of prompts: an int, a digit string, or ''/None for unconditional."""
        ids = []
        for p in prompts:
            if p is None or (isinstance(p, str) and p.strip() == ""):
                ids.append(self.num_classes)
                continue
            try:
                c = int(p)
            except (TypeError, ValueError):
                raise ValueError(f"the gmm testbed takes class labels 0..{self.num_classes - 1} as "
                                 f"prompts, got {p!r}") from None
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class label must be in 0..{self.num_classes - 1}, got {c}")
            ids.append(c)
        return torch.tensor(ids, device=self.device)

    # -- the exact denoiser ---------------------------------------------------------------------
    def posterior_mean(self, x: torch.Tensor, sigma, class_ids: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, 1)
        var = self.variances[None, :] + sigma**2                                  # (B|1, K)
        diff = x[:, None, :] - self.means[None]                                   # (B, K, d)
        dist2 = diff.square().sum(-1)                                             # (B, K)
        logp = self._class_log_weights[class_ids] - 0.5 * (
            dist2 / var + self.latent_shape[0] * var.log())
        w = torch.softmax(logp, dim=-1)                                           # (B, K)
        shrink = (self.variances[None, :] / var)[..., None]                       # (B|1, K, 1)
        comp = self.means[None] + shrink * diff                                   # (B, K, d)
        return torch.einsum("bk,bkd->bd", w, comp)

    def denoise(self, x: torch.Tensor, sigma, cond: torch.Tensor, guidance: float = 1.0
                ) -> torch.Tensor:
        d_c = self.posterior_mean(x, sigma, cond)
        if guidance == 1.0 or bool((cond == self.num_classes).all()):
            return d_c
        d_u = self.posterior_mean(x, sigma, torch.full_like(cond, self.num_classes))
        return d_u + guidance * (d_c - d_u)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    # -- the data distribution ------------------------------------------------------------------
    def sample_data(self, class_ids: Sequence[int] | None, n: int | None = None, seed: int = 0
                    ) -> torch.Tensor:
        """Exact samples x0 (float64, CPU): one per class id, or n unconditional ones."""
        g = torch.Generator().manual_seed(seed)
        h = self._host
        if class_ids is None:
            rows = torch.full((int(n),), self.num_classes)
        else:
            rows = torch.as_tensor(list(class_ids))
        masks = self._class_log_weights.cpu().double()[rows]
        comp = torch.multinomial(masks.exp(), 1, generator=g).squeeze(1)
        noise = torch.randn(len(rows), self.latent_shape[0], generator=g, dtype=torch.float64)
        return h["means"][comp] + h["variances"][comp].sqrt()[:, None] * noise

    def moments(self, class_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact mean and covariance of the data for a set of class ids drawn uniformly from the
        list (None: the unconditional mixture)."""
        h = self._host
        rows = [self.num_classes] if class_ids is None else list(class_ids)
        pi = self._class_log_weights.cpu().double()[torch.as_tensor(rows)].exp().mean(0)
        mu = pi @ h["means"]
        second = (pi[:, None, None] * (h["means"][:, :, None] * h["means"][:, None, :])).sum(0) \
            + torch.eye(self.latent_shape[0], dtype=torch.float64) * (pi * h["variances"]).sum()
        return mu.numpy(), (second - torch.outer(mu, mu)).numpy()
