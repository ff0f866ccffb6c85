"""Model + σ list + solver + CFG + FreeU plan → samples, batched, with one seed per image.

Each image's initial noise comes from its own CPU generator (``seed``), so an image does not depend
on the batch it is sampled in, nor on the device. The solver sees a closure over the model; the
FreeU plan, the non-finite check and any caller hook ride on the solver's per-step hook. A σ list
may start at ∞ (flow models): the state there is ε, and a flow model's own denoise and decode
convert between its x_t and the VE state y, as the SD backend scales its UNet input.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from . import solvers
from .freeu import FreeUPlan, clear
from .prompts import MAX_SEED
from .solvers import Hook, chain, check_finite


@dataclass
class Samples:
    latents: torch.Tensor                    # final solver state, float32, CPU
    images: Optional[torch.Tensor]           # decoded, float in [0, 1], (N, C, H, W); vectors for gmm
    prompts: list
    seeds: list[int]
    nfe: int                                 # model calls per image
    seconds: dict = field(default_factory=dict)   # "model", "solver", "decode"


def check_seeds(seeds: Sequence[int]) -> None:
    """Seeds a torch.Generator takes as they are: torch would say "Overflow when unpacking long
    long" past 2**64 − 1, and silently remap a negative seed to 2**64 + seed."""
    bad = [s for s in seeds if not 0 <= int(s) < MAX_SEED]
    if bad:
        raise ValueError(f"seeds must lie in 0..{MAX_SEED - 1} (a torch.Generator's range), got "
                         f"{bad[0]}")


def initial_noise(shape: Sequence[int], seeds: Sequence[int], sigma: float) -> torch.Tensor:
    """x_0 = σ_0 · ε with ε drawn from a CPU generator per image (float32). At σ_0 = ∞ (a flow
    model's t = 1) the solver state is ε itself, the limit of x/σ (see ``solvers``)."""
    check_seeds(seeds)
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for row, seed in enumerate(seeds):
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)), out=out[row])
    sigma = float(sigma)
    if math.isinf(sigma) and sigma > 0:
        return out
    return out.mul_(sigma)


class ModelCalls:
    """Wraps a model call ``fn(x, ...)`` to count the calls, the images (rows of x) they covered
    and the time spent in them (waiting for a CUDA device to finish), and to advance a tqdm-like
    ``progress`` by the rows of each call. ``rows / images`` is the NFE per image whatever the
    batching."""

    def __init__(self, fn, device=None, progress=None):
        self.fn, self.progress = fn, progress
        cuda = device is not None and torch.device(device).type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.calls = self.rows = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, *args):
        t0 = time.perf_counter()
        out = self.fn(x, *args)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += int(x.shape[0])
        if self.progress is not None:
            self.progress.update(int(x.shape[0]))
        return out


class FirstCalls:
    """The model's output at a σ list's first step, kept per batch of images.

    Every σ list that starts at the same σ_0 meets the same first state σ_0·ε (the seeds fix ε),
    so the first model call of a batch gives the same output for all of them. A study scores
    hundreds of lists on the same images; at 5 NFE this saves one call in five. A hit returns the
    very tensor the model gave for the same inputs and the same batch (its rows, σ_0, guidance,
    prompts, FreeU setting at step 0), so results never depend on what ran before. One cache
    serves one model; at most ``max_bytes`` of outputs are kept, the least recently used dropped.
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0
        self._store: OrderedDict = OrderedDict()
        self._bytes = 0

    def serve(self, denoise, x0: torch.Tensor, sigma0: float, guidance: float,
              plan: Optional[FreeUPlan], prompts, seeds):
        """``denoise`` for one batch of ``sample``, its first call — the one at (``x0``,
        ``sigma0``) — served from the cache: the same tensor object, not a copy (solvers move x out
        of place and never write into an output). ``denoise`` itself if the batch cannot be keyed."""
        key = _first_call_key(sigma0, guidance, plan, prompts, seeds)
        if key is None:
            return denoise
        first = True

        def call(x, sigma):
            nonlocal first
            is_first, first = first, False
            if not is_first or x is not x0 or float(sigma) != sigma0:
                return denoise(x, sigma)
            hit = self._store.get(key)
            if hit is not None:
                self._store.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
            out = denoise(x, sigma)
            self._keep(key, out)
            return out
        return call

    def _keep(self, key: tuple, out: torch.Tensor) -> None:
        size = _nbytes(out)
        if size > self.max_bytes:
            return
        self._store[key] = out
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self._bytes -= _nbytes(old)


def _nbytes(t: torch.Tensor) -> int:
    # the storage, not the view: a padded batch's output is a slice that keeps all its rows alive
    return t.untyped_storage().nbytes()


def _first_call_key(sigma0: float, guidance: float, plan: Optional[FreeUPlan], prompts, seeds):
    """What the first model call of a batch depends on besides the model; None when the prompts
    cannot be compared (then nothing is cached)."""
    step0 = plan.at(0) if plan is not None else None
    freeu = None if step0 is None else (plan.variant, tuple(sorted(step0.as_dict().items())))
    key = (sigma0, float(guidance), freeu, tuple(seeds), tuple(prompts))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _items(values, what: str) -> list:
    """A list from a list, tuple, array or tensor; a 0-d array or tensor is one value too few
    dimensions, and says so rather than 'iteration over a 0-d tensor'."""
    if getattr(values, "ndim", None) == 0:
        raise ValueError(f"{what} must be a list, one per image; got the single value "
                         f"{values.item()!r} (write [{values.item()!r}])")
    return list(values)


def _seed(s) -> int:
    """A seed as an int: Python and numpy integers and integer tensors; a float (0.5 ran as seed
    0) or a bool is refused."""
    if isinstance(s, torch.Tensor) and s.ndim == 0 and not s.is_floating_point() and \
            s.dtype != torch.bool:
        return int(s)
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
        raise ValueError(f"seeds must be integers, got {s!r}")
    return int(s)


def _checked(model, prompts, seeds, sigmas, freeu: Optional[FreeUPlan], batch_size: int):
    """``sample``'s inputs as lists and a float64 σ tensor, and the FreeU plan if it acts; a
    clear error for each way they cannot be sampled."""
    if isinstance(prompts, str):   # list("a cat") would be five one-letter prompts
        raise TypeError(f"prompts must be a list, one per image; got the string {prompts!r} "
                        f"(write [{prompts!r}])")
    prompts, seeds = list(prompts), [_seed(s) for s in _items(seeds, "seeds")]
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if not prompts:
        raise ValueError("nothing to sample: the prompt list is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if math.isinf(float(sigmas[0])) and model.table.kind != "flow":
        raise ValueError(f"a σ list starting at ∞ is for flow-matching models; {model.name} was "
                         f"trained on a DDPM table that ends at σ_max = {model.table.sigma_max:g}")
    plan = freeu if freeu is not None and freeu.active else None
    if plan is not None and model.unet is None:
        raise ValueError(f"FreeU needs a UNet model; {model.name} has none")
    return prompts, seeds, sigmas, plan


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def sample(model, sigmas, prompts: Sequence, seeds: Sequence[int], *, solver: str = "dpmpp_2m",
           guidance: float = 5.5, freeu: Optional[FreeUPlan] = None, batch_size: int = 16,
           hook: Optional[Hook] = None, decode: bool = True, progress=None,
           first_calls: Optional[FirstCalls] = None) -> Samples:
    """Sample one image per (prompt, seed) pair.

    ``sigmas``: a descending σ list (see ``schedules``). ``progress``: a tqdm-like object whose
    ``update(n)`` is called after each batch. ``first_calls``: a ``FirstCalls`` cache for this
    model, shared by calls that sample the same images with many σ lists. Raises
    ``solvers.NonFiniteError`` if the model's output turns non-finite, with the step and σ in the
    message.
    """
    prompts, seeds, sigmas, plan = _checked(model, prompts, seeds, sigmas, freeu, batch_size)
    solve = solvers.get(solver)
    device = torch.device(model.device)
    latents, images = [], []
    t_model = t_total = t_decode = 0.0
    nfe = None
    try:
        for sl in _batches(len(prompts), batch_size):
            t0 = time.perf_counter()
            cond = model.condition(prompts[sl])
            x = initial_noise(model.latent_shape, seeds[sl], float(sigmas[0])).to(device)
            denoise = lambda x_, s_, cond=cond: model.denoise(x_, s_, cond, guidance)
            if first_calls is not None:
                denoise = first_calls.serve(denoise, x, float(sigmas[0]), guidance, plan,
                                            prompts[sl], seeds[sl])
            timed = ModelCalls(denoise, device)
            step_hook = chain(plan.hook(model.unet) if plan is not None else None, check_finite, hook)
            x = solve(timed, x, sigmas, step_hook)
            timed.sync()
            t_total += time.perf_counter() - t0
            t_model += timed.seconds
            nfe = timed.calls
            if not bool(torch.isfinite(x).all()):
                raise solvers.NonFiniteError("the final sample is not finite")
            latents.append(x.float().cpu())
            if decode:
                t1 = time.perf_counter()
                images.append(model.decode(x).float().cpu())
                timed.sync()
                t_decode += time.perf_counter() - t1
            if progress is not None:
                progress.update(sl.stop - sl.start)
    finally:
        if plan is not None:
            clear(model.unet)
    return Samples(
        latents=torch.cat(latents), images=torch.cat(images) if decode else None,
        prompts=prompts, seeds=seeds, nfe=int(nfe),
        seconds={"model": t_model, "solver": t_total - t_model, "decode": t_decode})


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] → (N, H, W, C) uint8 (rounded, clipped)."""
    arr = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr
