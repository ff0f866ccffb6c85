"""ODE solvers on σ in data-prediction form, in the style of k-diffusion (see docs/solvers.md).

Every solver is ``solver(denoiser, x, sigmas, hook=None) -> x`` where ``denoiser(x, sigma)`` returns
the denoised estimate D(x; σ) for a Python float σ. ``hook(i, sigma, sigma_next, x, denoised)`` is
called once per step, right after the step's first model call and before x moves; it is how callers
toggle FreeU for the next call, record trajectories, or stop on non-finite values (by raising).

Per-step coefficients are computed once as Python floats, so a step costs one fused tensor
update on top of the model call.

A list may start at σ_0 = ∞ (flow models: t = 1, pure noise). The state there is ε = lim y/σ,
``denoiser(ε, inf)`` returns D_0, and every solver takes the σ_0 → ∞ limit of its own formulas
(docs/flow.md): the first step is y_1 = D_0 + σ_1·ε, and terms weighted by 1/h_0 or r_k = −∞ vanish.
"""

from __future__ import annotations

import functools
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


def _call(denoiser: Denoise, hook: Optional[Hook], x: torch.Tensor, s: list[float], i: int
          ) -> torch.Tensor:
    """Step i's model call, then the hook (before x moves)."""
    d = denoiser(x, s[i])
    if hook is not None:
        hook(i, s[i], s[i + 1], x, d)
    return d


def _floats(sigmas) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def _ddim(d: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """q·x + (1−q)·D, q = σ_{i+1}/σ_i; from σ = ∞ (x = ε) its limit D + σ_{i+1}·ε."""
    if math.isinf(sigma):
        return torch.add(d, x, alpha=sigma_next)
    return torch.lerp(d, x, sigma_next / sigma)


@torch.no_grad()
def dpmpp_1s(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
             ) -> torch.Tensor:
    """First-order DPM-Solver++ (= DDIM): x ← q·x + (1−q)·D, q = σ_{i+1}/σ_i."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        d = _call(denoiser, hook, x, s, i)
        x = _ddim(d, x, s[i], s[i + 1])
    return x


@torch.no_grad()
def dpmpp_2m(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
             ) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous D, one model call per step.

    The first step, and a final step to σ = 0, are first order; after a start at σ = ∞ the
    second step is too (its weight 1/(2r) = h/(2·h_0) → 0).
    """
    s = _floats(sigmas)
    d_prev, h_prev = None, None
    for i in range(len(s) - 1):
        d = _call(denoiser, hook, x, s, i)
        if s[i + 1] == 0:
            x = d
            continue
        h = math.log(s[i] / s[i + 1])
        if d_prev is None:
            x = _ddim(d, x, s[i], s[i + 1])
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
        d = _call(denoiser, hook, x, s, i)
        if math.isinf(s[i]):
            x = _ddim(d, x, s[i], s[i + 1])
            continue
        x = x + (x - d) / s[i] * (s[i + 1] - s[i])
    return x


@torch.no_grad()
def heun(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None) -> torch.Tensor:
    """Heun's method (Karras et al. Alg. 1, no churn): 2 model calls per step, 1 for a step to 0.

    From σ = ∞ the trapezoid in σ has no finite limit; that step is Heun in u = 1/σ on z = y/σ
    (dz/du = D, z = ε at u = 0): y_1 = σ_1·ε + (D_0 + D(D_0 + σ_1·ε; σ_1))/2.
    """
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        d = _call(denoiser, hook, x, s, i)
        if math.isinf(s[i]):
            x = _heun_from_infinity(denoiser, d, x, s[i + 1])
            continue
        slope = (x - d) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + slope * dt
            continue
        x2 = x + slope * dt
        slope2 = (x2 - denoiser(x2, s[i + 1])) / s[i + 1]
        x = x + (slope + slope2) * (dt / 2)
    return x


def _heun_from_infinity(denoiser: Denoise, d: torch.Tensor, eps: torch.Tensor, sigma_next: float
                        ) -> torch.Tensor:
    guess = torch.add(d, eps, alpha=sigma_next)
    if sigma_next == 0:
        return guess
    return torch.add((d + denoiser(guess, sigma_next)) / 2, eps, alpha=sigma_next)


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """A small dense linear solve in float64, returned as Python floats."""
    a = torch.tensor(rows, dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(rhs, dtype=torch.float64)).tolist()


@functools.lru_cache(maxsize=1024)   # the same σ list is replayed step by step (PresetScheduler)
def _unipc_rhos(rks: tuple[float, ...], h: float, bh1: bool = False
                ) -> tuple[list[float], list[float]]:
    """UniPC's weights for B(h) = expm1(−h) (or B(h) = −h with ``bh1``) in the data-prediction
    form.

    ``rks`` are r_k = log(σ_i/σ_{i−k})/h (< 0) for the k = 1..p−1 older model outputs of a step of
    order p. Returns the p−1 predictor weights and the p corrector weights (the last one for the
    model output at the new point): the solutions of Σ_k ρ_k r_k^(j−1) = b_j (r = 1 for the new
    point), b_j = j!·(−h)·φ_{j+1}(−h)/B(h) with the exponential-integrator φ functions, by
    diffusers' recursion (Zhao et al. 2023, Alg. 2 and 3). ρ = ½ where p = 2 (predictor) or 1.
    """
    order = len(rks) + 1
    if order == 1:
        return [], [0.5]
    b = _unipc_b(h, order, bh1)
    rows = [[r ** j for r in (*rks, 1.0)] for j in range(order)]
    pred = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
    return pred, _solve(rows, b)


def _unipc_b(h: float, count: int, bh1: bool = False) -> list[float]:
    """b_j = j!·(−h)·φ_{j+1}(−h)/B(h), j = 1..count, by diffusers' recursion; B(h) = −h for bh1,
    expm1(−h) for bh2 (the φ recursion itself starts from expm1(−h) in both)."""
    hh = -h
    e = math.expm1(hh)
    b_h = hh if bh1 else e
    phi, fact, b = e / hh - 1.0, 1, []
    for j in range(1, count + 1):
        b.append(phi * fact / b_h)
        fact *= j + 1
        phi = phi / hh - 1.0 / fact
    return b


@functools.lru_cache(maxsize=64)
def _unipc_rhos_after_infinity(rks: tuple[float, ...], h: float, bh1: bool = False
                               ) -> tuple[list[float], list[float]]:
    """The r → −∞ limit of ``_unipc_rhos`` when the oldest node is σ = ∞ (``rks`` holds the
    finite ones): that node's weight and its highest-power equation drop out, leaving the
    Vandermonde systems on the other nodes, solved as such (no fixed ρ = ½ there)."""
    m = len(rks)
    b = _unipc_b(h, m + 1, bh1)
    rows = [[r ** j for r in (*rks, 1.0)] for j in range(m + 1)]
    pred = _solve([r[:-1] for r in rows[:-1]], b[:m]) if m else []
    return pred, _solve(rows, b)


def unipc(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, B(h) = expm1(−h) ("bh2"), one call per step.

    UniP-p: x_{i+1} = q·x_i + (1−q)·D_i + (1−q)·Σ_k ρ_k·(D_{i−k} − D_i)/r_k, q = σ_{i+1}/σ_i,
    h = log(σ_i/σ_{i+1}), r_k = log(σ_i/σ_{i−k})/h, of order p = min(3, steps left, steps done + 1)
    (diffusers' ``lower_order_final=True``); ρ = ½ for p = 2, else from a (p−1)×(p−1) system.
    UniC: once D_{i+1} = D(x_{i+1}) is known, the same step is redone with it as an extra node
    (weights from the p×p system) and x_{i+1} is replaced by the corrected value; no extra model
    call, and no corrector after the last step. A step to σ = 0 is always the last one, so it is
    first order: x = D.

    ``hook`` sees the x the model was just evaluated at, i.e. the predictor's x_i, before the
    corrector replaces it (so ``denoised`` is exactly D(x; σ_i) of the x passed). The corrector
    starts again from x_{i−1}, so an in-place edit of x_i is overwritten, as in diffusers.

    From σ = ∞ the first step is D_0 + σ_1·ε and the node at ∞ (r = −∞) drops out of the later
    weights (``_unipc_rhos_after_infinity``).
    """
    return _unipc(denoiser, x, sigmas, hook, bh1=False)


def unipc_bh1(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
              ) -> torch.Tensor:
    """UniPC with B(h) = h ("bh1"; diffusers' ``solver_type="bh1"``, ComfyUI's ``uni_pc``, the
    variant F-scheduler runs). The same orders, nodes and steps as ``unipc``; only the weights
    change: b_j is divided by B(h) = −h instead of expm1(−h), and the correction terms are scaled
    by h instead of 1 − q = −expm1(−h). The two agree as h → 0; on long steps bh1's corrections
    are larger (Zhao et al. 2023 recommend it for few-step unconditional sampling)."""
    return _unipc(denoiser, x, sigmas, hook, bh1=True)


@torch.no_grad()
def _unipc(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook], bh1: bool
           ) -> torch.Tensor:
    s = _floats(sigmas)
    if bh1 and s[0] == math.inf:
        raise ValueError("unipc_bh1 cannot start at σ = ∞ (a flow-matching model): its first "
                         "corrector weight h/2 is infinite there; use unipc (bh2)")
    n = len(s) - 1
    ds: list[torch.Tensor] = []  # the model outputs of the last steps, newest last
    pending = None  # the corrector of the previous step: (x without its last term, weight, D_prev)
    for i in range(n):
        d = _call(denoiser, hook, x, s, i)
        if pending is not None:
            partial, w, d_prev = pending
            x = partial + w * (d - d_prev)
        ds = (ds + [d])[-3:]
        q = s[i + 1] / s[i]
        base = _ddim(d, x, s[i], s[i + 1])  # q·x + (1−q)·D_i
        if i == n - 1:  # order 1, no corrector: also covers a final step to σ = 0
            x = base
            break
        h = math.log(s[i] / s[i + 1])
        order = min(3, n - i, i + 1)
        # a node at σ = ∞ has r = −∞ and drops out of both systems (_unipc_rhos_after_infinity)
        rks = tuple(math.log(s[i] / s[i - k]) / h for k in range(1, order) if s[i - k] < math.inf)
        rho_p, rho_c = (_unipc_rhos(rks, h, bh1) if len(rks) == order - 1
                        else _unipc_rhos_after_infinity(rks, h, bh1))
        f = h if bh1 else 1 - q  # −B(h), the scale of every correction term
        diffs = [(ds[-1 - k] - d) / rks[k - 1] for k in range(1, len(rks) + 1)]
        # x is handed to the model next; never the corrector's own tensor, which must not see
        # in-place edits of x (as in diffusers, the corrector restarts from the previous x)
        x = base + sum((f * r) * dk for r, dk in zip(rho_p, diffs)) if diffs else base.clone()
        partial = base + sum((f * r) * dk for r, dk in zip(rho_c, diffs)) if diffs else base
        pending = (partial, f * rho_c[-1], d)
    return x


@torch.no_grad()
def dpmpp_3m(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None
             ) -> torch.Tensor:
    """Deterministic DPM-Solver++(3M) (k-diffusion's ``sample_dpmpp_3m_sde`` with eta = 0).

    x ← q·x + (1−q)·D_i + φ₂·d₁ − φ₃·d₂, q = e^(−h), φ₂ = expm1(−h)/h + 1, φ₃ = φ₂/h − ½, where with
    r₀ = h_{i−1}/h, r₁ = h_{i−2}/h, a = (D_i − D_{i−1})/r₀, b = (D_{i−1} − D_{i−2})/r₁:
    d₁ = a + (a − b)·r₀/(r₀ + r₁), d₂ = (a − b)/(r₀ + r₁). The first step is first order, the second
    uses φ₂·a only; a step to σ = 0 is x = D. One model call per step. After a start at σ = ∞
    the terms of h_0 = ∞ vanish: steps 1, 2 and 3 have orders 1, 1 and 2.
    """
    s = _floats(sigmas)
    hist: list[tuple[torch.Tensor, float]] = []  # (D, h) of the previous steps, newest first
    for i in range(len(s) - 1):
        d = _call(denoiser, hook, x, s, i)
        if s[i + 1] == 0:
            x = d
            continue
        h = math.log(s[i] / s[i + 1])
        x = _ddim(d, x, s[i], s[i + 1])
        phi2 = math.expm1(-h) / h + 1
        if len(hist) >= 2:
            (d1, h1), (d2, h2) = hist[0], hist[1]
            r0, r1 = h1 / h, h2 / h
            phi3 = phi2 / h - 0.5
            c = (phi2 * r0 - phi3) / (r0 + r1)  # φ₂·d₁ − φ₃·d₂ = φ₂·a + c·(a − b)
            x = x + ((phi2 + c) / r0) * (d - d1) - (c / r1) * (d1 - d2)
        elif hist:
            d1, h1 = hist[0]
            x = x + (phi2 * h / h1) * (d - d1)
        hist = [(d, h)] + hist[:1]
    return x


# Adams–Bashforth weights for the newest slope first, orders 1..4
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def ipndm(denoiser: Denoise, x: torch.Tensor, sigmas, hook: Optional[Hook] = None) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023; diff-sampler's ``ipndm_sampler``, max_order 4): one call per step.

    Adams–Bashforth on dx/dσ = d_i = (x_i − D_i)/σ_i with Δ = σ_{i+1} − σ_i:
    x ← x + Δ·Σ_j c_j·d_{i−j}, c = (1), (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24 as the
    order rises 1, 2, 3, 4 with the steps done. A step to σ = 0 is the same step (Δ = −σ_i); it
    equals x = D only when it is first order. From σ = ∞ (x = ε) the first slope is ε and the
    first step its Euler limit D_0 + σ_1·ε.
    """
    s = _floats(sigmas)
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(len(s) - 1):
        d = _call(denoiser, hook, x, s, i)
        if math.isinf(s[i]):
            slopes = [x]
            x = _ddim(d, x, s[i], s[i + 1])
            continue
        slopes = [(x - d) / s[i]] + slopes[:3]
        dt = s[i + 1] - s[i]
        step = sum(c * g for c, g in zip(_AB[len(slopes)], slopes))
        x = x + dt * step
    return x


SOLVERS = {"dpmpp_1s": dpmpp_1s, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun,
           "unipc": unipc, "unipc_bh1": unipc_bh1, "dpmpp_3m": dpmpp_3m, "ipndm": ipndm}
_ALIASES = {"dpm++1s": "dpmpp_1s", "dpm++2m": "dpmpp_2m", "ddim": "dpmpp_1s", "1s": "dpmpp_1s",
            "2m": "dpmpp_2m", "dpm++3m": "dpmpp_3m", "3m": "dpmpp_3m", "uni_pc_bh2": "unipc",
            "uni_pc": "unipc_bh1", "unipc_bh2": "unipc"}  # ComfyUI's names: uni_pc is bh1


def canonical(name: str) -> str:
    """'DPM++2M', 'dpmpp_2m', '2m' → 'dpmpp_2m'."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} "
                         "(or DPM++1S / DPM++2M / DPM++3M), "
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
