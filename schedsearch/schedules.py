"""Sampling schedules: small functions that return a descending σ tensor (float64, CPU).

A schedule ending in 0 runs its last step to the clean sample; one ending at σ > 0 (the paper's)
leaves noise of that scale for the VAE to absorb. Either way the number of model calls of a
one-call-per-step solver is ``len(sigmas) - 1``. Formulas and sources: docs/schedules.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .noise import SD, NoiseTable

# Align Your Steps 10-step tables (Sabour et al., 2024), σ descending.
AYS_TABLES = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
}

# The paper's settings (docs/schedules.md). M, k give the stopping level explicitly; sd15-6 and sdxl-8 do not
# follow the closed form stop → (N + stop + 1, N + 1).
PAPER_SETTINGS = {
    "sd15-5": dict(steps=5, p1=5.0, p2=1.2, M=8, k=6),
    "sd15-6": dict(steps=6, p1=5.0, p2=1.2, M=8, k=6),
    "sd15-8": dict(steps=8, p1=7.0, p2=1.2, M=12, k=9),
    "sdxl-6": dict(steps=6, p1=5.0, p2=1.2, M=8, k=6),
    "sdxl-8": dict(steps=8, p1=12.0, p2=1.2, M=12, k=10),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(name: str, value: float) -> float:
    value = float(value)
    _require(math.isfinite(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")
    return value


MAX_STEPS = 10_000   # ten times a DDPM's training steps; more is a typo, not a schedule


def _steps(steps: int) -> int:
    _require(isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
             and 1 <= steps <= MAX_STEPS,
             f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    return int(steps)


def _range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    sigma_min, sigma_max = _positive("sigma_min", sigma_min), _positive("sigma_max", sigma_max)
    _require(sigma_min < sigma_max,
             f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max


def _with_zero(sigmas: np.ndarray, append_zero: bool) -> torch.Tensor:
    if append_zero:
        sigmas = np.append(sigmas, 0.0)
    return torch.from_numpy(np.ascontiguousarray(sigmas, dtype=np.float64))


def _numbers(sigmas) -> np.ndarray:
    """A σ list as float64, refusing what only looks numeric (JSON true/false: float(True) = 1)."""
    if isinstance(sigmas, torch.Tensor):
        return sigmas.detach().cpu().double().numpy().reshape(-1)
    if isinstance(sigmas, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in sigmas):
        raise ValueError(f"sigmas must be a list of numbers, got {list(sigmas)!r}")
    try:
        return np.asarray(sigmas, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sigmas must be a list of numbers, got {sigmas!r}") from exc


def explicit(sigmas: Sequence[float] | torch.Tensor | np.ndarray, *, first: int = 0
             ) -> torch.Tensor:
    """Validate a user σ list: finite, strictly decreasing, positive except an optional final 0.
    ``first``: the index its first value has in the user's list (a flow list's tail from 1)."""
    s = _numbers(sigmas)
    _require(len(s) >= 2, f"sigmas must hold at least 2 values (one step), got {len(s)}")
    last = len(s) - 1
    for i, v in enumerate(s):
        at = i + first
        _require(math.isfinite(v), f"sigmas[{at}] = {v} is not a finite number")
        _require(v > 0 or (i == last and v == 0),
                 f"sigmas[{at}] = {v}: sigmas must be > 0, except an optional final 0")
        _require(i == 0 or v < s[i - 1],
                 f"sigmas must be strictly decreasing: sigmas[{at}] = {v} is not below "
                 f"sigmas[{at - 1}] = {s[i - 1]}")
    return torch.from_numpy(s.copy())


def karras(steps: int, sigma_min: float = SD.sigma_min, sigma_max: float = SD.sigma_max,
           rho: float = 7.0, append_zero: bool = True) -> torch.Tensor:
    """Karras et al. (EDM): ``steps`` σ values spaced evenly in σ^(1/ρ), then 0."""
    steps, rho = _steps(steps), _positive("rho", rho)
    sigma_min, sigma_max = _range(sigma_min, sigma_max)
    ramp = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho, append_zero)


def stop_sigma(steps: int, p1: float, stop: float | None = None, *, M: int | None = None,
               k: int | None = None, table: NoiseTable = SD) -> float:
    """σ_stop of the paper's schedule: point k of an M-point Karras ramp with exponent p1; from
    ``stop``, M = steps + stop + 1 and k = steps + 1, so k/(M−1) = (steps+1)/(steps+stop)."""
    steps, p1 = _steps(steps), _positive("p1", p1)
    if M is None and k is None:
        _require(stop is not None, "give stop, or M and k")
        # A real-valued stop is the continuous relaxation the search uses (integers are the
        # paper's); it also expresses presets such as sd15-6 whose (M, k) have no integer stop.
        _require(isinstance(stop, (int, float, np.integer, np.floating)) and not isinstance(stop, bool)
                 and math.isfinite(stop) and stop >= 1, f"stop must be a number >= 1, got {stop!r}")
        M, k = steps + float(stop) + 1, steps + 1
    else:
        _require(stop is None, "give either stop or (M, k), not both")
        _require(M is not None and k is not None, "M and k must be given together")
        _require(isinstance(M, (int, np.integer)) and M >= 3,
                 f"M must be an integer >= 3, got {M!r}")
        _require(isinstance(k, (int, np.integer)) and 1 <= k <= M - 2,
                 f"k must be an integer in [1, M-2] = [1, {M - 2}], got {k!r}")
    lo, hi = table.sigma_min ** (1 / p1), table.sigma_max ** (1 / p1)
    return float((hi + k / (M - 1) * (lo - hi)) ** p1)


def paper(steps: int, p1: float, p2: float, stop: float | None = None, *, M: int | None = None,
          k: int | None = None, final_denoise: bool = False, table: NoiseTable = SD) -> torch.Tensor:
    """The schedule of "Hyperparameters are all you need", as its code computes it.

    ``steps`` model calls from σ_max down to σ_stop, spaced as a power-``p2`` ramp in the timestep
    t. No 0 is appended: the last latent keeps noise of scale σ_stop. ``final_denoise`` appends 0,
    which costs one more model call (x = D(x, σ_stop)).
    """
    steps, p2 = _steps(steps), _positive("p2", p2)
    t_stop = float(table.sigma_to_t(stop_sigma(steps, p1, stop, M=M, k=k, table=table)))
    t_max = table.t_max
    i = np.arange(steps + 1) / steps
    t = (t_max ** (1 / p2) + i * (t_stop ** (1 / p2) - t_max ** (1 / p2))) ** p2
    t[0], t[-1] = t_max, t_stop  # exact end points, free of pow round-off
    return _with_zero(table.t_to_sigma(t), final_denoise)


def paper_preset(name: str, final_denoise: bool = False, table: NoiseTable = SD) -> torch.Tensor:
    _require(name in PAPER_SETTINGS,
             f"unknown paper preset {name!r}; choose from {', '.join(PAPER_SETTINGS)}")
    return paper(**PAPER_SETTINGS[name], final_denoise=final_denoise, table=table)


def ays(steps: int, family: str = "sd15") -> torch.Tensor:
    """Align Your Steps, log-linearly interpolated from its 10-step table; last value → 0."""
    steps = _steps(steps)
    _require(family in AYS_TABLES, f"family must be one of {', '.join(AYS_TABLES)}, got {family!r}")
    ys = np.log(np.asarray(AYS_TABLES[family][::-1]))
    xs = np.linspace(0, 1, len(ys))
    s = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    s[-1] = 0.0
    return torch.from_numpy(s)


def uniform(steps: int, table: NoiseTable = SD) -> torch.Tensor:
    """Uniform in t, "trailing": t = t_max·(1 − i/steps) for i < steps, then σ = 0."""
    steps = _steps(steps)
    t = table.t_max * (1 - np.arange(steps) / steps)
    return _with_zero(np.atleast_1d(table.t_to_sigma(t)), True)


def logsnr(steps: int, sigma_min: float = SD.sigma_min, sigma_max: float = SD.sigma_max
           ) -> torch.Tensor:
    """Uniform in log-SNR (= −2 log σ) from σ_max to σ_min, then 0."""
    steps = _steps(steps)
    sigma_min, sigma_max = _range(sigma_min, sigma_max)
    return _with_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)), True)


def timesteps(sigmas: torch.Tensor, table: NoiseTable = SD) -> torch.Tensor:
    """Fractional model timesteps of the evaluated points (every σ but the last)."""
    return torch.as_tensor(table.sigma_to_t(sigmas[:-1].double().cpu().numpy()), dtype=torch.float64)


# -- free-form knots --------------------------------------------------------------------------
# The free-form family's lowest reachable σ, as a fraction of the table's σ_min: strictly below it,
# so a schedule that ends on σ_min (Karras, GITS, OSS) is an interior point of the space. A UNet
# is then evaluated at t = 0 (σ→t clamps), where ε-prediction is still well defined.
KNOT_FLOOR = 0.5
KNOT_ENDS = ("zero", "sigma")


def _knot_fractions(fractions: Sequence[float], end: str) -> list[float]:
    _require(end in KNOT_ENDS, f"knots end must be one of {KNOT_ENDS}, got {end!r}")
    u = [float(f) for f in fractions]
    for i, f in enumerate(u):
        _require(math.isfinite(f) and 0 < f < 1, f"knot fraction {i} must lie in (0, 1), got {f!r}")
    _require(len(u) >= (1 if end == "sigma" else 0), "a σ list ending above 0 needs at least one "
             "fraction (its σ_end)")
    return u


def knots(fractions: Sequence[float], *, sigma_max: float = SD.sigma_max,
          sigma_floor: float = KNOT_FLOOR * SD.sigma_min, end: str = "zero") -> torch.Tensor:
    """A free-form σ list in stick-breaking form: from σ_0 = σ_max, each next value moves a
    fraction u ∈ (0, 1) of the log-σ distance still left down to σ_floor,

        log σ_{i+1} = log σ_i − u_i · (log σ_i − log σ_floor),

    so every strictly decreasing list in (σ_floor, σ_max] is reachable and ordering holds by
    construction. ``end="zero"``: the fractions give σ_1 … σ_{N−1} and σ_N = 0 (a last step to
    the clean sample; N = len(fractions) + 1 steps). ``end="sigma"``: they give σ_1 … σ_N, the last
    being σ_end > 0 whose noise is left in the sample (N = len(fractions) steps).
    """
    sigma_max, sigma_floor = _range(sigma_floor, sigma_max)[::-1]
    u = _knot_fractions(fractions, end)
    floor = math.log(sigma_floor)
    logs = [math.log(sigma_max)]
    for f in u:
        logs.append(logs[-1] - f * (logs[-1] - floor))
    return _with_zero(np.exp(np.asarray(logs)), end == "zero")


def knot_fractions(sigmas, *, sigma_max: float = SD.sigma_max,
                   sigma_floor: float = KNOT_FLOOR * SD.sigma_min) -> tuple[list[float], str]:
    """The exact inverse of ``knots``: (fractions, end) of a σ list that starts at σ_max and stays
    above σ_floor (a final 0 excepted)."""
    s = explicit(sigmas).tolist()
    _require(abs(s[0] - sigma_max) <= 1e-9 * sigma_max,
             f"a knots schedule starts at σ_max = {sigma_max:g}; this one starts at {s[0]:g}")
    end = "zero" if s[-1] == 0 else "sigma"
    positive = s[:-1] if end == "zero" else s
    _require(positive[-1] > sigma_floor, f"σ = {positive[-1]:g} lies at or below the knots' floor "
             f"σ_floor = {sigma_floor:g}")
    floor, logs = math.log(sigma_floor), [math.log(sigma_max)] + [math.log(v) for v in positive[1:]]
    return [(a - b) / (a - floor) for a, b in zip(logs, logs[1:])], end


FLOW_NAMES = ("flow", "optimalsteps")   # flow-matching models only (build_flow, docs/flow.md)
NAMES = ("karras", "paper", "ays", "uniform", "logsnr", "explicit", "knots", *PAPER_SETTINGS,
         *FLOW_NAMES)


def build(spec: dict, table: NoiseTable = SD) -> torch.Tensor:
    """A σ list from a JSON-able spec, e.g. ``{"name": "paper", "steps": 5, "p1": 5, "p2": 1.2,
    "stop": 2}``. The spec is the schedule's provenance; this is the one place that reads it."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a schedule spec must be an object with a 'name'; got {spec!r}")
    if table.kind == "flow":  # σ lists from ∞: see build_flow
        return build_flow(spec, table)
    p = dict(spec)
    name = p.pop("name")
    _require(name in NAMES, f"unknown schedule {name!r}; choose from {', '.join(NAMES)}")
    _require(name not in FLOW_NAMES, f"schedule {name!r} is for flow-matching models (SD3, FLUX, "
             f"the flow testbeds); this model's noise table is {table.fingerprint()}")
    if name == "explicit":
        return explicit(p.get("sigmas", []))
    if name == "knots":
        return knots(p.get("fractions", []), end=p.get("end", "zero"),
                     sigma_max=p.get("sigma_max", table.sigma_max),
                     sigma_floor=p.get("sigma_floor", KNOT_FLOOR * table.sigma_min))
    if name in PAPER_SETTINGS:
        steps = p.pop("steps", None)
        _require(steps in (None, PAPER_SETTINGS[name]["steps"]),
                 f"preset {name} has {PAPER_SETTINGS[name]['steps']} steps; got steps={steps}")
        return paper_preset(name, final_denoise=bool(p.pop("final_denoise", False)), table=table)
    steps = p.pop("steps", None)
    _require(steps is not None, f"schedule {name!r} needs 'steps'")
    if name in ("karras", "logsnr"):
        p.setdefault("sigma_min", table.sigma_min)
        p.setdefault("sigma_max", table.sigma_max)
    if name in ("paper", "uniform"):
        p["table"] = table
    fn = {"karras": karras, "paper": paper, "ays": ays, "uniform": uniform, "logsnr": logsnr}[name]
    return _made(name, fn, steps, p, explicit)


def _made(name: str, fn, steps, p: dict, check) -> torch.Tensor:
    """``fn(steps, **p)``, its list checked as a user's would be (``check``): extreme exponents
    (ρ, p1, p2 near 0) or σ near the float range overflow, or round neighbouring σ to the same
    value or to 0, which no solver can step through."""
    def shown() -> str:   # only for a message: build() runs once per trial
        return ", ".join(f"{k}={v}" for k, v in p.items() if k != "table")

    try:
        sigmas = fn(steps, **p)
    except TypeError as exc:
        raise ValueError(f"bad parameters for schedule {name!r}: {exc}") from None
    except (OverflowError, ZeroDivisionError):
        raise ValueError(f"schedule {name!r} ({shown()}) overflows float64: choose less extreme "
                         f"parameters") from None
    try:
        return check(sigmas)
    except ValueError as exc:
        raise ValueError(f"schedule {name!r} ({shown()}) gives an unusable σ list ({exc}): "
                         f"choose less extreme parameters") from None


def equivalent_stop(steps: int, M: int, k: int) -> float:
    """The real ``stop`` whose closed form gives the same σ_stop as an explicit (M, k)."""
    return (steps + 1) * (M - 1) / k - steps


# -- flow-matching models (docs/flow.md) ------------------------------------------------------------
# A flow model's σ lists start at ∞ (t = 1, pure noise). The time shift t ↦ s·t/(1 + (s−1)·t) is
# σ ↦ s·σ, so a shifted schedule is the unshifted one scaled by s.
from .noise import flow_sigma, flow_t  # noqa: E402  (kept with the flow section it serves)

# OptimalSteps (Pei, Hu, Gu): the noise levels of ComfyUI's OptimalStepsScheduler node
# (comfy_extras/nodes_optimalsteps.py, comfyanonymous/ComfyUI at
# 36d3468fce685fd8f4548347067097282216d4a5), copied from bebebe666/OptimalSteps. ComfyUI's
# "sigma" of a flow model is its time t, so these are t values; the first is below 1.
OPTIMAL_STEPS_T = {
    "flux": [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001],
}


def _flow_table(table):
    _require(table.kind == "flow",
             "this schedule is for flow-matching models; the model's noise table is "
             f"{table.fingerprint()}")
    return table


def _from_t(t: np.ndarray, append_zero: bool) -> torch.Tensor:
    """σ = t/(1−t) for unit times t, t = 1 → ∞ exactly."""
    return _with_zero(np.atleast_1d(flow_sigma(np.asarray(t, dtype=np.float64))), append_zero)


def flow_shifted(steps: int, table, shift: float | None = None) -> torch.Tensor:
    """A flow model's default schedule as diffusers computes it (``FlowMatchEulerDiscreteScheduler.
    set_timesteps``, the t-grid of the model's pipeline, its fixed or resolution-dependent shift),
    as σ: ∞, …, then 0. ``shift`` replaces the table's s (1 gives the unshifted grid)."""
    steps, table = _steps(steps), _flow_table(table)
    if shift is not None:
        import dataclasses  # only here: the flow section keeps to the end of this module

        table = dataclasses.replace(table, shift=_positive("shift", shift), mu=None, name="")
    return _from_t(table.default_t(steps), True)


def optimal_steps(steps: int, model_type: str = "flux") -> torch.Tensor:
    """ComfyUI's OptimalStepsScheduler (denoise 1): the table as is for 10 steps, else
    ``steps + 1`` points log-linearly interpolated (its ``loglinear_interp``), the last set to 0;
    as σ = t/(1−t). Its first t is 0.9968, so the list starts at σ ≈ 311, not at ∞."""
    steps = _steps(steps)
    key = str(model_type).lower()
    _require(key in OPTIMAL_STEPS_T, f"model_type must be one of {', '.join(OPTIMAL_STEPS_T)}, "
             f"got {model_type!r}")
    t = np.asarray(OPTIMAL_STEPS_T[key], dtype=np.float64)
    if steps + 1 != len(t):
        xs, ys = np.linspace(0, 1, len(t)), np.log(t[::-1])
        t = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    return _from_t(t[:-1], True)


def flow_karras(steps: int, table, sigma_min: float | None = None,
                sigma_max: float = math.inf, rho: float = 7.0) -> torch.Tensor:
    """Karras' ρ-ramp on a flow model, in its time t as diffusers (``use_karras_sigmas``) and
    ComfyUI's karras scheduler apply it there: t^(1/ρ) evenly from t(σ_max) (1 for σ_max = ∞)
    to t(σ_min), then σ = 0. A ramp in σ^(1/ρ) cannot start at σ = ∞."""
    steps, rho, table = _steps(steps), _positive("rho", rho), _flow_table(table)
    lo = _positive("sigma_min", table.sigma_min if sigma_min is None else sigma_min)
    hi = float(sigma_max)
    _require(hi > lo and not math.isnan(hi), f"sigma_max must be > sigma_min = {lo:g}, got {hi!r}")
    ramp = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
    top, bottom = flow_t(hi) ** (1 / rho), flow_t(lo) ** (1 / rho)
    t = (top + ramp * (bottom - top)) ** rho
    if steps > 1:  # exact end points, free of pow round-off (t = 1 must stay 1: σ = ∞)
        t[-1] = flow_t(lo)
    t[0] = flow_t(hi)
    return _from_t(t, True)


_finite_explicit = explicit   # flow_explicit's own reference, whatever callers rebind


def flow_explicit(sigmas) -> torch.Tensor:
    """An explicit σ list for a flow model: as ``explicit``, and the first value may be ∞."""
    s = _numbers(sigmas).tolist()
    if len(s) < 2 or s[0] != math.inf:
        return _finite_explicit(s)
    if len(s) == 2:
        _require(math.isfinite(s[1]) and s[1] >= 0, f"sigmas[1] = {s[1]} must be a finite σ >= 0")
        return torch.tensor(s, dtype=torch.float64)
    return torch.cat([torch.tensor([math.inf], dtype=torch.float64),
                      _finite_explicit(s[1:], first=1)])


def flow_knots(fractions: Sequence[float], *, sigma_floor: float, end: str = "zero"
               ) -> torch.Tensor:
    """The free-form knots on a flow model: σ_0 = ∞ is fixed; the first fraction places σ_1 in
    the model's time, t_1 = 1 − u_0·(1 − t_floor), since log σ has no finite top; the others
    break the log-σ stick from σ_1 down to σ_floor as ``knots`` does. Every strictly decreasing
    list from ∞ whose positive values stay above σ_floor is reachable, the model's default
    schedule among them. ``end`` as in ``knots``; no fraction at all is the one step [∞, 0]."""
    floor = _positive("sigma_floor", sigma_floor)
    u = _knot_fractions(fractions, end)
    if not u:
        return _with_zero(np.array([math.inf]), True)
    first = float(flow_sigma(1 - u[0] * (1 - flow_t(floor))))
    if end == "sigma" and len(u) == 1:   # σ_1 is the end itself
        return torch.tensor([math.inf, first], dtype=torch.float64)
    rest = knots(u[1:], sigma_max=first, sigma_floor=floor, end=end)
    return torch.cat([torch.tensor([math.inf], dtype=torch.float64), rest])


def flow_knot_fractions(sigmas, *, sigma_floor: float) -> tuple[list[float], str]:
    """The exact inverse of ``flow_knots``: (fractions, end) of a σ list that starts at ∞ and
    stays above σ_floor (a final 0 excepted)."""
    s = flow_explicit(sigmas).tolist()
    _require(s[0] == math.inf, f"a flow knots schedule starts at σ = ∞; this one starts at {s[0]:g}")
    if len(s) == 2 and s[1] == 0:
        return [], "zero"
    _require(s[1] > sigma_floor, f"σ = {s[1]:g} lies at or below the knots' floor "
             f"σ_floor = {sigma_floor:g}")
    first = (1 - flow_t(s[1])) / (1 - flow_t(sigma_floor))
    if len(s) == 2:
        return [first], "sigma"
    rest, end = knot_fractions(s[1:], sigma_max=s[1], sigma_floor=sigma_floor)
    return [first, *rest], end


def build_flow(spec: dict, table) -> torch.Tensor:
    """``build`` for a flow model's table (docs/flow.md): the σ-range families start at ∞."""
    table = _flow_table(table)
    p = dict(spec)
    name = p.pop("name")
    _require(name in NAMES, f"unknown schedule {name!r}; choose from {', '.join(NAMES)}")
    _require(name not in ("paper", "ays", *PAPER_SETTINGS),
             f"schedule {name!r} is defined on the Stable Diffusion noise table and has no "
             f"faithful flow-model analogue (docs/flow.md); use flow, optimalsteps, karras, "
             f"uniform, knots or explicit")
    if name == "explicit":
        return flow_explicit(p.get("sigmas", []))
    if name == "knots":
        _require(p.get("sigma_max", math.inf) == math.inf, "a flow knots schedule starts at ∞")
        return flow_knots(p.get("fractions", []), end=p.get("end", "zero"),
                          sigma_floor=p.get("sigma_floor", KNOT_FLOOR * table.sigma_min))
    steps = p.pop("steps", None)
    _require(steps is not None, f"schedule {name!r} needs 'steps'")
    if name == "logsnr":
        _require(math.isfinite(p.get("sigma_max", math.inf)),
                 "logsnr needs a finite sigma_max on a flow model (log-SNR has no finite top)")
        p.setdefault("sigma_min", table.sigma_min)
    fn = {"flow": flow_shifted, "optimalsteps": optimal_steps, "karras": flow_karras,
          "uniform": uniform, "logsnr": logsnr}[name]
    if name in ("flow", "karras", "uniform"):
        p["table"] = table
    return _made(name, fn, steps, p, flow_explicit)
