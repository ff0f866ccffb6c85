"""OSS — Optimal Stepsize Search by dynamic programming on the student's own states
(Pei, Hu, Gu, "Optimal Stepsize for Diffusion Sampling"; see docs/baselines.md).

For each sample, level k of the DP keeps one student state per grid point j: the one with the
lowest squared error to the teacher at j among the states reachable in at most k+1 steps
(``dp[k+1] = dp[k]``, the reference's carry). Each level evaluates the model once at every live
state — all of them, of all samples, in batched calls with per-image σ — and tries every first-order
(DPM++1S) jump from it to every lower grid point. After M levels the best state at the data end
gives the sample's schedule; the per-position median over samples gives the model's.

Choices made here, where the paper is silent or its reference code differs:

* Paths are tracked per state (each state carries the grid indices it came through), so a
  backtracked path is always the one that produced its state. The reference's trace table can mix
  levels when a carried entry is used; here that cannot happen.
* A flow-matching model's grid starts at T[N] = σ = ∞ (docs/flow.md): the state there is ε (the
  sampler's convention), and a student jump from it to T[j] is the first-order step's limit
  D + T[j]·ε (``student_step``), the solvers' own first step; the free start puts ε·T[i] at every
  finite T[i] and ε itself at ∞.
* Start: by default every path starts at σ_max from the sampler's initial noise, so level 0 has one
  live state per sample and a search costs N + 1 + (M−1)·N model calls per sample (teacher
  included). ``free_start=True`` is the reference's quirk: a path may start at any T[i] from the
  same ε scaled to T[i] (``initial_noise`` at σ = T[i], which is what the sampler does for a
  schedule that starts there); all N states are live from level 0 and the cost is N + M·N.
* Ties between predecessors go to the highest index, as the reference's loop (i from N down, strict
  ``<``) resolves them.
* Median: the lower median (the ⌈S/2⌉-th smallest index at each position), so each position is an
  actual grid index and σ is exactly a teacher grid value; per-position order statistics of
  strictly decreasing paths are strictly decreasing, so the result is a valid schedule.
* With the carry, the best state at the data end may come from a path of fewer than M steps. The
  schedule must spend exactly the budget (docs/conventions.md), so the backtrack starts from the
  best landing on T[0] at the last level among states that are exactly M−1 steps from the start
  (same states, same model calls; only the final pick is restricted).
  ``provenance["shorter_better"]`` counts the samples where a shorter path would have landed
  closer. A sample without any M-step path (not seen in practice) is left out of the median and
  counted in ``provenance["no_full_path"]``.
* Amplitude calibration (off by default) rescales each state affinely before its step so that its
  5% and 95% quantiles match the teacher's at that grid point. It only shapes the search: the
  sampler does not calibrate, so a schedule searched with it is scored without it.
"""

from __future__ import annotations

from numbers import Integral

import torch

from .sampler import ModelCalls
from .teacher import Distilled, Teacher

_CHUNK_ELEMENTS = 1 << 24   # bound on the (rows, N+1, d) landing tensor built at once


def _check_budget(budget: int, teacher: Teacher) -> int:
    n = teacher.steps
    if isinstance(budget, bool) or not isinstance(budget, Integral) or budget < 1:
        raise ValueError(f"the budget M must be an integer >= 1, got {budget!r}")
    if budget >= n:
        raise ValueError(f"the budget M = {budget} must be smaller than the teacher's N = {n} "
                         f"steps (use more --teacher-steps)")
    return int(budget)


def _calibrate(z: torch.Tensor, q_target: torch.Tensor) -> torch.Tensor:
    """Affine map of each row of z (R, d) so its 5%/95% quantiles become q_target (R, 2)."""
    q = torch.quantile(z, torch.tensor([0.05, 0.95], device=z.device, dtype=z.dtype), dim=1).T
    scale = (q_target[:, 1] - q_target[:, 0]) / (q[:, 1] - q[:, 0]).clamp_min(1e-12)
    return (z - q[:, :1]) * scale[:, None] + q_target[:, :1]


def lower_median(paths: torch.Tensor) -> torch.Tensor:
    """Per-position lower median of (S, L) integer paths."""
    return paths.sort(dim=0).values[(paths.shape[0] - 1) // 2]


class _Levels:
    """The DP's state over the grid, per sample: one student state per grid point, its error to
    the teacher there, the path that produced it, and whether it still takes a step."""

    def __init__(self, X: torch.Tensor, T: torch.Tensor, m: int, free_start: bool):
        S, n1, _ = X.shape
        n, device = n1 - 1, X.device
        self.Z = torch.zeros_like(X)
        self.live = torch.zeros(S, n1, dtype=torch.bool, device=device)
        if free_start:
            # the teacher's state at T[N] is σ_max·ε, or ε itself at σ = ∞ (a flow model)
            top = bool(torch.isinf(T[n]))
            eps = X[:, n] if top else X[:, n] / T[n]
            self.Z[:, 1:] = eps[:, None] * T[None, 1:, None]
            if top:
                self.Z[:, n] = eps
            self.live[:, 1:] = True
        else:
            self.Z[:, n] = X[:, n]
            self.live[:, n] = True
        self.dp = torch.full((S, n1), torch.inf, device=device)
        self.paths = torch.full((S, n1, m + 1), -1, dtype=torch.long, device=device)
        self.paths[:, :, 0] = torch.arange(n1, device=device)
        self.lengths = self.live.long()                                  # points on the path

    def advance(self, cost: torch.Tensor, z: torch.Tensor, den: torch.Tensor, s_idx, i_idx,
                T: torch.Tensor) -> None:
        """Keep, per (sample, grid point), the better of the carried state and the best jump
        into it (ties to the highest predecessor, as the reference resolves them)."""
        S, n1 = self.dp.shape
        n, device = n1 - 1, self.dp.device
        best, flipped = cost.flip(1).min(dim=1)
        best_i = n - flipped                                             # (S, N+1)
        better = best < self.dp
        better[:, n] = False
        if not bool(better.any()):
            return
        row_of = torch.full((S, n1), -1, dtype=torch.long, device=device)
        row_of[s_idx, i_idx] = torch.arange(len(z), device=device)
        s_new, j_new = better.nonzero(as_tuple=True)
        i_new = best_i[s_new, j_new]
        r = row_of[s_new, i_new]
        Z_next = self.Z.clone()
        Z_next[s_new, j_new] = student_step(den[r], z[r], T[i_new], T[j_new])
        new_paths = self.paths[s_new, i_new].clone()
        k = self.lengths[s_new, i_new]
        new_paths[torch.arange(len(k), device=device), k] = j_new
        self.paths[s_new, j_new] = new_paths
        self.lengths[s_new, j_new] = k + 1
        self.dp = torch.where(better, best, self.dp)
        self.live[s_new, j_new] = j_new > 0      # a state at the data end takes no further step
        self.Z = Z_next


def _denoise_live(levels: _Levels, denoise, model, teacher: Teacher, T, q_teacher,
                  batch_size: int):
    """One model call per live state, packed across samples: (sample, grid index, state, D)."""
    shape = tuple(teacher.x.shape[2:])
    s_idx, i_idx = levels.live.nonzero(as_tuple=True)                  # rows, sample-major
    z = levels.Z[s_idx, i_idx]
    if q_teacher is not None:
        z = _calibrate(z, q_teacher[s_idx, i_idx])
    den = torch.empty_like(z)
    for a in range(0, len(z), batch_size):
        b = min(len(z), a + batch_size)
        cond = model.condition([teacher.prompts[s] for s in s_idx[a:b].tolist()])
        den[a:b] = denoise(z[a:b].view(b - a, *shape), T[i_idx[a:b]], cond).flatten(1).float()
    return s_idx, i_idx, z, den


def student_step(den: torch.Tensor, z: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor
                 ) -> torch.Tensor:
    """The first-order (DPM++1S) step of each row from σ = t_from to t_to: q·z + (1−q)·D with
    q = t_to/t_from, and from σ = ∞ (where the state z is ε and q = 0) its limit D + t_to·ε, the
    solvers' own first step (not a lerp with ratio 0, which would drop the noise)."""
    land = torch.lerp(den, z, (t_to / t_from)[:, None])
    top = torch.isinf(t_from)
    if bool(top.any()):   # never taken on a finite grid: DDPM results stay bit for bit
        land[top] += t_to[top, None] * z[top]
    return land


def _jump_costs(X, z, den, s_idx, i_idx, ratio, below, T) -> torch.Tensor:
    """cost[s, i, j]: error at T[j] of the first-order jump from the state at T[i] (from
    T[N] = ∞ the step's limit D + T[j]·ε, as ``student_step``)."""
    S, n1, d = X.shape
    cost = torch.full((S, n1, n1), torch.inf, device=X.device)
    rows = max(1, _CHUNK_ELEMENTS // (n1 * d))
    to = torch.where(torch.isinf(T), torch.zeros_like(T), T)[None, :, None]   # (1, N+1, 1)
    for a in range(0, len(z), rows):
        b = min(len(z), a + rows)
        q = ratio[i_idx[a:b]][:, :, None]                                # (r, N+1, 1)
        land = torch.lerp(den[a:b, None], z[a:b, None], q)              # (r, N+1, d)
        top = torch.isinf(T[i_idx[a:b]])
        if bool(top.any()):
            land[top] += to * z[a:b][top][:, None]
        c = (land - X[s_idx[a:b]]).square().mean(2)
        cost[s_idx[a:b], i_idx[a:b]] = c.masked_fill(~below[i_idx[a:b]], torch.inf)
    return cost


@torch.no_grad()
def search(model, teacher: Teacher, budget: int, *, free_start: bool = False,
           calibrate: bool = False, batch_size: int = 256, progress=None) -> Distilled:
    """Run the OSS dynamic programme on the teacher's samples; see the module docstring.

    ``batch_size``: images per model call (the level's live states are packed across samples).
    ``progress``: tqdm-like, ``update(k)`` after each model call on k states.
    """
    m = _check_budget(budget, teacher)
    device = torch.device(model.device)
    S, n = len(teacher.seeds), teacher.steps
    T = teacher.sigmas.to(device, torch.float32)
    X = teacher.x.to(device).flatten(2)                                   # (S, N+1, d)
    # [i, j] = T[j]/T[i] for j < i (0 from T[N] = ∞: the jump's limit is added in _jump_costs)
    ratio = torch.nan_to_num(T[None, :] / T[:, None].clamp_min(1e-30), nan=0.0).tril(-1)
    below = torch.ones(n + 1, n + 1, dtype=torch.bool, device=device).tril(-1)   # [i, j]: j < i
    q_teacher = None
    if calibrate:
        q_teacher = torch.quantile(X.reshape(-1, X.shape[2]),
                                   torch.tensor([0.05, 0.95], device=device),
                                   dim=1).T.reshape(S, n + 1, 2)
    levels = _Levels(X, T, m, free_start)
    denoise = ModelCalls(lambda x, s, cond: model.denoise(x, s, cond, teacher.guidance),
                         model.device, progress)
    for level in range(m):
        s_idx, i_idx, z, den = _denoise_live(levels, denoise, model, teacher, T, q_teacher,
                                             batch_size)
        cost = _jump_costs(X, z, den, s_idx, i_idx, ratio, below, T)
        if level == m - 1:
            break
        levels.advance(cost, z, den, s_idx, i_idx, T)
    # the final pick: landings on T[0] from states exactly M−1 steps from the start
    full = levels.lengths == m
    final, flipped = cost[:, :, 0].masked_fill(~full, torch.inf).flip(1).min(dim=1)
    carried = torch.minimum(levels.dp[:, 0], cost[:, :, 0].min(dim=1).values)
    return _result(teacher, levels, final, n - flipped, carried, denoise.rows,
                   dict(budget=m, free_start=bool(free_start), calibrate=bool(calibrate)))


def _result(teacher: Teacher, levels: _Levels, final, final_i, carried, rows: int,
            settings: dict) -> Distilled:
    """The median schedule over the samples' own M-step paths, with the search's provenance."""
    S, n, m = len(teacher.seeds), teacher.steps, settings["budget"]
    ok = torch.isfinite(final)
    if not bool(ok.any()):
        raise RuntimeError("OSS found no path of exactly M steps to the data end for any sample")
    chosen = levels.paths[torch.arange(S, device=final.device), final_i].clone()
    chosen[:, m] = 0
    median = lower_median(chosen[ok])
    errors = final[ok].double()
    provenance = {
        "method": "oss", **settings,
        "teacher": teacher.provenance(),
        "solver": "dpmpp_1s",
        "grid_indices": median.tolist(),
        "median": "lower (order statistic (S-1)//2 of each position)",
        "paths": [chosen[s].tolist() if bool(ok[s]) else None for s in range(S)],
        "shorter_better": int((carried < final).sum()),
        "no_full_path": int((~ok).sum()),
        "samples": S,
        "calls_per_sample": {"teacher": n, "search": rows / S, "total": n + rows / S},
        "teacher_calls_this_run": teacher.calls,
        "final_error": float(errors.mean()),
        "final_error_per_sample": [float(e) if bool(o) else None
                                   for e, o in zip(final.double(), ok)],
        "error": "mean squared error to the teacher at the data end, each sample's own M-step path",
    }
    return Distilled(teacher.sigmas[median.cpu()], provenance)
