"""GITS — geometry-inspired time scheduling (Chen et al., ICML 2024; see docs/baselines.md).

From the teacher's own states and derivatives, the cost of one jump from grid point i to a lower
point j is ``C[i][j] = ‖x_tea[i] + (t_j − t_i)·d_i − x_tea[j]‖`` (the L2 norm over the whole
latent), averaged over samples; the schedule is the exact K-edge shortest path from σ_max to the
data end with the jump at position m (from the start) weighted by ``coeff**m``, as the recursion
``V[j][k] = min_i C[j][i] + coeff·V[i][k−1]`` weights it. No model calls beyond the teacher.

The time variable is σ itself: the probability-flow ODE in VE form is dx/dσ = (x − D)/σ, so
``d_i = (x_tea[i] − D_tea[i]) / σ_i`` and a jump is an Euler step in σ — the same arithmetic as the
DPM++1S student step (q·x + (1−q)·D with q = σ_j/σ_i), so the cost measures exactly the local error
the sampler will make from the teacher's state. On a flow-matching model the grid starts at
σ = ∞, where the teacher's state is ε: a jump from there lands at the step's limit D + σ_j·ε (the
solvers' own first step), so its cost is finite and the path from ∞ is searched like any other.
"""

from __future__ import annotations

import math

import torch

from .oss import _check_budget
from .teacher import Distilled, Teacher

_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def cost_matrix(teacher: Teacher) -> torch.Tensor:
    """C[i, j] (float64, (N+1, N+1)), finite for j < i, +inf elsewhere; indices ascend in σ."""
    T = teacher.sigmas.float()
    X = teacher.x.flatten(2).float()                                  # (S, N+1, d)
    D = teacher.denoised.flatten(2).float()
    S, n1, d = X.shape
    C = torch.full((n1, n1), torch.inf, dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // (S * n1 * d))
    to = torch.where(torch.isinf(T), torch.zeros_like(T), T)[None, None, :, None]
    for a in range(1, n1, step):
        i = torch.arange(a, min(n1, a + step))
        q = (T[None, :] / T[i, None])[None, :, :, None]              # (1, r, N+1, 1): σ_j/σ_i
        land = torch.lerp(D[:, i, None], X[:, i, None], q)            # Euler in σ from x_tea[i]
        top = torch.isinf(T[i])
        if bool(top.any()):   # from σ = ∞ (x_tea = ε, q = 0) the jump's limit D + σ_j·ε
            land[:, top] += to * X[:, i[top], None]
        dist = (land - X[:, None]).square().sum(-1).sqrt().double().mean(0)   # (r, N+1)
        below = torch.arange(n1)[None, :] < i[:, None]
        C[i] = dist.masked_fill(~below, torch.inf)
    return C


def shortest_path(C: torch.Tensor, steps: int, coeff: float = 1.2) -> tuple[list[int], float]:
    """Exact ``steps``-edge path N → 0 minimising Σ_m coeff**m · C[p_m, p_{m+1}]."""
    n = C.shape[0] - 1
    V = torch.full((steps + 1, n + 1), torch.inf, dtype=torch.float64)
    V[0, 0] = 0.0
    arg = torch.zeros((steps + 1, n + 1), dtype=torch.long)
    for k in range(1, steps + 1):
        total = C + coeff * V[k - 1][None, :]                          # [j, i]: jump j → i first
        V[k], arg[k] = total.min(dim=1)
    path, j = [n], n
    for k in range(steps, 0, -1):
        j = int(arg[k, j])
        path.append(j)
    return path, float(V[steps, n])


def check_coeff(coeff: float) -> float:
    """The step-weight growth as a float: finite and > 0 (a weight of inf or nan has no path)."""
    coeff = float(coeff)
    if not (coeff > 0 and math.isfinite(coeff)):
        raise ValueError(f"coeff must be a finite number > 0, got {coeff}")
    return coeff


def search(teacher: Teacher, budget: int, *, coeff: float = 1.2) -> Distilled:
    """The GITS schedule of ``budget`` steps on the teacher's grid; see the module docstring."""
    m = _check_budget(budget, teacher)
    coeff = check_coeff(coeff)
    C = cost_matrix(teacher)
    path, cost = shortest_path(C, m, coeff)
    provenance = {
        "method": "gits",
        "budget": m,
        "coeff": coeff,
        "teacher": teacher.provenance(),
        "time_variable": "sigma (Euler step in sigma = DPM++1S)",
        "grid_indices": path,
        "path_cost": cost,
        "step_costs": [float(C[a, b]) for a, b in zip(path, path[1:])],
        "samples": len(teacher.seeds),
        "calls_per_sample": {"teacher": teacher.steps, "search": 0, "total": teacher.steps},
        "teacher_calls_this_run": teacher.calls,
    }
    return Distilled(teacher.sigmas[torch.tensor(path)], provenance)
