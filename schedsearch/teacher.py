"""Teacher trajectories: a fine first-order solve on the model's own grid, kept state by state.

The distilled baselines (OSS, GITS; see docs/baselines.md) need, for every (prompt, seed) pair,
the teacher's state x_tea[j] at every point T[j] of a fine grid and the denoised value D_tea[j]
there. Grid indices follow the OSS convention: T[0] is the data end, T[N] = σ_max, so arrays are
*ascending* in σ.

Choices (the papers are silent on them):

* The default grid is uniform in the DDPM timestep t: N points t = t_max … 0 (σ_max … σ_min, t→σ by
  the ᾱ-linear rule of ``NoiseTable.t_to_sigma``), then σ = 0 appended as T[0]. The data end is
  therefore the clean sample, the same end point as every schedule that ends in 0 (Karras, AYS,
  uniform, log-SNR), and its last step σ_min → 0 is x = D(x, σ_min). ``end="sigma_min"`` puts
  N+1 points on [σ_min, σ_max] instead, and ``end=<σ>`` ends the grid at σ > 0 (a teacher for
  schedules that stop early, such as the paper's presets).
* On a flow-matching model (docs/flow.md) the grid is uniform in the model's time t from t = 1
  (σ = ∞) down to the data end, so T[N] = ∞; the state stored there is ε (the sampler's state at
  ∞) and the first DPM++1S step from it is the solvers' own limit, D + σ_1·ε.
* The teacher starts from ``sampler.initial_noise`` with the same seeds, so it starts from the
  very noise every other sampler uses for those seeds, and runs the solvers module's own DPM++1S.
* D at T[0] is never evaluated; ``denoised[:, 0]`` holds x[:, 0] (exact when T[0] = 0).

Trajectories are cached as safetensors under a hash of (model fingerprint, dtype, prompts, seeds,
guidance, grid, solver), in ``$SCHEDSEARCH_CACHE/teacher`` (default
``~/.cache/schedsearch/teacher``).
The key is also stored in the file's header and checked on load: a file that cannot be read, holds
the wrong shapes or non-finite values, or was written for another model or setting is recomputed
(with a ``TeacherCacheWarning``), never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import files, schedules, solvers
from .noise import NoiseTable, flow_sigma, flow_t
from .sampler import ModelCalls, initial_noise, sample

FORMAT_VERSION = "1"
GRID_KINDS = ("uniform", "karras", "logsnr")
TEACHER_SOLVERS = ("dpmpp_1s",)


class TeacherCacheWarning(files.CacheWarning):
    """A cached teacher file was unusable and has been recomputed."""


def cache_dir(override: Optional[str] = None) -> str:
    """``override``, else ``$SCHEDSEARCH_CACHE/teacher``, else ``~/.cache/schedsearch/teacher``."""
    return override or str(files.cache_dir("teacher"))


@dataclass(frozen=True)
class TeacherGrid:
    """The teacher's fine grid: ``steps`` = N model calls, N+1 points.

    ``kind``: spacing of the points above the data end — uniform in t, Karras (``rho``) or
    uniform in log σ. ``end``: ``"zero"`` (N points σ_max … σ_min, then 0), ``"sigma_min"``
    (N+1 points σ_max … σ_min) or a σ > 0 (N+1 points σ_max … σ).
    """

    kind: str = "uniform"
    steps: int = 100
    end: Union[str, float] = "zero"
    rho: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise ValueError(f"teacher grid must be one of {', '.join(GRID_KINDS)}, "
                             f"got {self.kind!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or not 2 <= self.steps <= schedules.MAX_STEPS:
            raise ValueError(f"teacher steps must be an integer in [2, {schedules.MAX_STEPS}], "
                             f"got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if isinstance(self.end, str):
            if self.end not in ("zero", "sigma_min"):
                raise ValueError(f"grid end must be 'zero', 'sigma_min' or a σ > 0, "
                                 f"got {self.end!r}")
        else:
            end = float(self.end)
            if not (math.isfinite(end) and end > 0):
                raise ValueError(f"grid end must be 'zero', 'sigma_min' or a σ > 0, "
                                 f"got {self.end!r}")
            object.__setattr__(self, "end", end)

    def sigmas(self, table: NoiseTable) -> torch.Tensor:
        """T[0] … T[N], ascending (T[0] = data end), float64. On a flow model T[N] = ∞."""
        n = self.steps
        lo = table.sigma_min if isinstance(self.end, str) else self.end
        if lo >= table.sigma_max:
            raise ValueError(f"grid end σ = {lo:g} must lie below σ_max = {table.sigma_max:g}")
        points = n if self.end == "zero" else n + 1
        if table.kind == "flow":
            desc = self._flow_points(table, points, lo)
        elif self.kind == "uniform":
            t = np.linspace(table.t_max, float(table.sigma_to_t(lo)), points)
            desc = np.asarray(table.t_to_sigma(t), dtype=np.float64)
        elif self.kind == "karras":
            desc = schedules.karras(points, lo, table.sigma_max, self.rho,
                                    append_zero=False).numpy()
        else:
            desc = np.exp(np.linspace(math.log(table.sigma_max), math.log(lo), points))
        desc[0], desc[-1] = table.sigma_max, lo  # exact end points, free of interpolation round-off
        if self.end == "zero":
            desc = np.append(desc, 0.0)
        return schedules.flow_explicit(desc).flip(0).contiguous()

    def _flow_points(self, table, points: int, lo: float) -> np.ndarray:
        """A flow model's grid from σ = ∞ (t = 1) down to ``lo``: uniform in its time t, or
        Karras' ρ-ramp in t (``schedules.flow_karras``, as diffusers and ComfyUI apply Karras to
        flow models); log-σ spacing has no finite top to start from."""
        if self.kind == "logsnr":
            raise ValueError("a logsnr teacher grid needs a finite σ_max; a flow model's starts "
                             "at σ = ∞ (use the uniform or karras grid)")
        if self.kind == "uniform":
            return np.atleast_1d(flow_sigma(np.linspace(1.0, flow_t(lo), points)))
        return schedules.flow_karras(points, table, sigma_min=lo, rho=self.rho)[:-1].numpy()

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Teacher:
    """One fine trajectory per (prompt, seed) pair; index j of the grid axis ↔ σ = sigmas[j]."""

    sigmas: torch.Tensor          # (N+1,) float64, ascending, sigmas[0] = data end
    x: torch.Tensor               # (S, N+1, *latent) float32: the state at each grid point
    denoised: torch.Tensor        # (S, N+1, *latent) float32: D(x[:, j], sigmas[j]);
                                  # [:, 0] = x[:, 0]
    prompts: list
    seeds: list
    guidance: float
    grid: TeacherGrid
    solver: str
    key: dict
    key_hash: str
    path: Optional[str] = None    # the cache file, if any
    calls: int = 0                # model calls per sample spent by this call (0 on a cache hit)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def final(self) -> torch.Tensor:
        """The teacher's sample at the data end, (S, *latent)."""
        return self.x[:, 0]

    def provenance(self) -> dict:
        return {"key": self.key, "hash": self.key_hash, "steps": self.steps,
                "sigma_end": float(self.sigmas[0]), "sigma_max": float(self.sigmas[-1])}


def _pairs(prompts: Sequence, seeds: Sequence[int]) -> tuple[list, list[int]]:
    prompts = list(prompts)
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be integers, got {seeds!r}") from None
    if not seeds:
        raise ValueError("the seed list is empty: give at least one seed")
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and "
                         f"{len(seeds)} seeds")
    return prompts, seeds


def _dtype_name(model) -> str:
    return str(model.dtype).replace("torch.", "")


def make_key(model, prompts: Sequence, seeds: Sequence[int], guidance: float, grid: TeacherGrid,
             solver: str = "dpmpp_1s") -> dict:
    """The cache key: everything the trajectories depend on. Prompts and seeds enter as a hash
    (a COCO prompt list is long); their count is kept readable."""
    pairs = json.dumps([[str(p) for p in prompts], [int(s) for s in seeds]])
    return {
        "version": FORMAT_VERSION,
        "model": model.fingerprint(),
        "dtype": _dtype_name(model),
        "latent_shape": [int(v) for v in model.latent_shape],
        "pairs": hashlib.sha256(pairs.encode()).hexdigest()[:20],
        "n": len(seeds),
        "guidance": float(guidance),
        "grid": grid.as_json(),
        "solver": solver,
    }


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _cache_path(directory: str, key: dict, key_hash: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"])[:60]
    return os.path.join(directory, f"{stem}-{key_hash}.safetensors")


def _load(path: str, key: dict, sigmas: torch.Tensor, shape: tuple) -> Optional[dict]:
    """The cached tensors if the file is sound and was written for exactly ``key``; else None
    with a warning saying why."""
    def reject(why: str):
        warnings.warn(f"teacher cache {path}: {why}; recomputing it", TeacherCacheWarning,
                      stacklevel=3)
        return None

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("x", "denoised", "sigmas")}
    except Exception as exc:  # safetensors raises several types on damaged files
        return reject(f"unreadable ({type(exc).__name__}: {exc})")
    try:
        stored = json.loads(meta.get("schedsearch.teacher.key", ""))
    except json.JSONDecodeError:
        return reject("no schedsearch teacher key in the file header")
    if not isinstance(stored, dict):   # JSON, but not the object this module writes
        return reject(f"its teacher key is {stored!r}, not a JSON object")
    if stored.get("model") != key["model"]:
        return reject(f"written for model {stored.get('model')!r}, not {key['model']!r}")
    if stored != key:
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        return reject(f"written for other settings (differs in {', '.join(diff)})")
    if tuple(tensors["x"].shape) != shape or tuple(tensors["denoised"].shape) != shape:
        return reject(f"holds shape {tuple(tensors['x'].shape)}, expected {shape}")
    if tensors["sigmas"].shape != sigmas.shape or not torch.allclose(
            tensors["sigmas"].double(), sigmas, rtol=1e-12, atol=0):
        return reject("its σ grid differs from the requested one")
    if not (torch.isfinite(tensors["x"]).all() and torch.isfinite(tensors["denoised"]).all()):
        return reject("holds non-finite values")
    return tensors


def _save(path: str, key: dict, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor
          ) -> None:
    tensors = {"x": x.contiguous(), "denoised": denoised.contiguous(),
               "sigmas": sigmas.contiguous()}
    meta = {"schedsearch.teacher.key": json.dumps(key, sort_keys=True),
            "format_version": FORMAT_VERSION}
    # a concurrent reader sees the old file or the whole new one, never half
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@torch.no_grad()
def _solve(model, sigmas: torch.Tensor, prompts: list, seeds: list[int], guidance: float,
           solver: str, batch_size: int, progress) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = len(sigmas) - 1
    shape = tuple(model.latent_shape)
    x_all = torch.empty((len(seeds), n + 1, *shape), dtype=torch.float32)
    d_all = torch.empty_like(x_all)
    descending = sigmas.flip(0)
    denoise = ModelCalls(lambda x, s, cond: model.denoise(x, s, cond, guidance), model.device,
                         progress)
    solve = solvers.get(solver)
    for start in range(0, len(seeds), batch_size):
        sl = slice(start, min(len(seeds), start + batch_size))
        cond = model.condition(prompts[sl])
        x0 = initial_noise(shape, seeds[sl], float(descending[0])).to(model.device)

        def record(i, sigma, sigma_next, x, d, sl=sl):
            x_all[sl, n - i] = x.float().cpu()   # solver step i starts at ascending index n − i
            d_all[sl, n - i] = d.float().cpu()

        final = solve(lambda x, s: denoise(x, s, cond), x0, descending,
                      solvers.chain(solvers.check_finite, record))
        x_all[sl, 0] = d_all[sl, 0] = final.float().cpu()
    return x_all, d_all, denoise.rows // len(seeds)


def trajectories(model, prompts: Sequence, seeds: Sequence[int], *, guidance: float = 5.5,
                 grid: TeacherGrid = TeacherGrid(), solver: str = "dpmpp_1s",
                 cache: Optional[str] = None, use_cache: bool = True, batch_size: int = 64,
                 progress=None) -> Teacher:
    """The teacher trajectories of ``model`` for each (prompt, seed) pair, from the cache when a
    sound one exists (no model calls), else computed (N calls per sample) and cached.

    ``cache``: the cache directory (default: see ``cache_dir``). ``progress``: a tqdm-like object,
    ``update(k)`` after each model call on k images.
    """
    prompts, seeds = _pairs(prompts, seeds)
    solver = solvers.canonical(solver)
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"the teacher runs first-order steps; solver must be dpmpp_1s, "
                         f"got {solver!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sigmas = grid.sigmas(model.table)
    key = make_key(model, prompts, seeds, guidance, grid, solver)
    key_hash = _key_hash(key)
    shape = (len(seeds), len(sigmas), *model.latent_shape)
    path = _cache_path(cache_dir(cache), key, key_hash) if use_cache else None
    common = dict(prompts=prompts, seeds=seeds, guidance=float(guidance), grid=grid, solver=solver,
                  key=key, key_hash=key_hash, path=path)
    if path is not None and os.path.exists(path):
        hit = _load(path, key, sigmas, shape)
        if hit is not None:
            return Teacher(sigmas=sigmas, x=hit["x"], denoised=hit["denoised"], calls=0, **common)
    x, d, calls = _solve(model, sigmas, prompts, seeds, guidance, solver, batch_size, progress)
    if path is not None:
        try:
            _save(path, key, sigmas, x, d)
        except OSError as exc:  # a read-only or full disk costs the cache, not the result
            warnings.warn(f"could not write the teacher cache {path} ({exc.strerror or exc}); "
                          f"it is recomputed next time: point --cache-dir or SCHEDSEARCH_CACHE "
                          f"at a folder you can write to", TeacherCacheWarning, stacklevel=2)
    return Teacher(sigmas=sigmas, x=x, denoised=d, calls=calls, **common)


# -- what every distilled schedule returns, and how it is scored ---------------------------------

@dataclass
class Distilled:
    """A schedule distilled from a teacher: ``sigmas`` (descending float64 tensor, validated by
    ``schedules.flow_explicit``: a flow model's list starts at ∞) and a JSON-able
    ``provenance``."""

    sigmas: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sigmas = schedules.flow_explicit(self.sigmas)
        self.provenance.setdefault("schedule", {"name": "explicit", "sigmas": self.sigmas.tolist()})

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def as_json(self) -> dict:
        return {"sigmas": self.sigmas.tolist(), "provenance": self.provenance}


@torch.no_grad()
def error_vs_teacher(model, sigmas, teacher: Teacher, *, solver: str = "dpmpp_1s",
                     batch_size: int = 64, progress=None) -> torch.Tensor:
    """Per-sample mean squared error between sampling ``sigmas`` with ``solver`` and the
    teacher's state at its data end, on the teacher's own prompts and seeds (float64, (S,)).

    A schedule that stops at σ > 0 is compared with the teacher's data end all the same; pass a
    teacher built with ``TeacherGrid(end=σ)`` to compare at the same σ instead.
    """
    samples = sample(model, sigmas, teacher.prompts, teacher.seeds, solver=solver,
                     guidance=teacher.guidance, batch_size=batch_size, decode=False,
                     progress=progress)
    diff = samples.latents.double() - teacher.final.double()
    return diff.flatten(1).square().mean(1)
