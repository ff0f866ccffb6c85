"""The search space: its ranges, how a trial samples a point of it, and the preset that point is.

A point is (p1, p2, stop, final denoise, solver, FreeU switch, start t_aug and b1, b2, s1, s2,
FreeU variant[, guidance]) — the schedule family of "Hyperparameters are all you need" (Li, 2025;
docs/schedules.md). Its σ list always spends exactly the budget: with a final denoise the paper
schedule gets budget − 1 steps and σ = 0 is appended, so no candidate can miss the budget.
``Space.suggest`` samples a point through an Optuna trial and returns the ``Preset`` that is
scored; ``Space.preset`` rebuilds the same preset from stored trial parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import optuna

from . import presets, schedules, solvers
from .freeu import FreeU, FreeUPlan
from .noise import NoiseTable
from .presets import Preset

FREEU_KEYS = ("b1", "b2", "s1", "s2")

DEFAULT_SPACE = {
    "p1": [2.0, 14.0],          # stop-ramp exponent (paper: 5, 7, 12)
    "p2": [0.6, 2.5],           # t-grid exponent (paper: 1.2)
    "stop": [1.0, 8.0],         # stopping index, real-valued (paper: 2, 3)
    "solver": ["dpmpp_1s", "dpmpp_2m"],
    "final_denoise": [False, True],
    "freeu": True,              # search t_aug and the FreeU values (UNet models only)
    "b1": [1.0, 1.6], "b2": [1.0, 1.6], "s1": [0.2, 1.0], "s2": [0.1, 1.0],
    "freeu_variant": ["diffusers", "original"],
    "guidance": None,           # fixed per study; a [lo, hi] range opens it
}


def _range(space: dict, key: str) -> tuple[float, float]:
    v = space[key]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and v[0] <= v[1]):
        raise ValueError(f"search space {key!r} must be [low, high], got {v!r}")
    return float(v[0]), float(v[1])


@dataclass(frozen=True)
class Target:
    """What every candidate of one study shares: the budget, the model's noise table and family,
    whether FreeU can act (the model has a UNet), and the guidance when it is not searched."""

    budget: int
    table: NoiseTable
    family: str
    guidance: float
    freeu_ok: bool


@dataclass
class Space:
    """The search space from the study config (``space:``), validated when it is built."""

    ranges: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))

    def __post_init__(self) -> None:
        unknown = set(self.ranges) - set(DEFAULT_SPACE)
        if unknown:
            raise ValueError(f"unknown search-space keys: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(DEFAULT_SPACE)}")
        self.ranges = {**DEFAULT_SPACE, **self.ranges}
        r = self.ranges
        if _range(r, "p1")[0] <= 0 or _range(r, "p2")[0] <= 0:
            raise ValueError("search space: p1 and p2 must stay > 0")
        if _range(r, "stop")[0] < 1:
            raise ValueError("search space: stop must stay >= 1")
        for k in FREEU_KEYS:
            if _range(r, k)[0] <= 0:
                raise ValueError(f"search space: FreeU {k} must stay > 0 (diffusers treats 0 as off)")
        for s in r["solver"]:
            solvers.canonical(s)
        if r["guidance"] is not None:
            _range(r, "guidance")

    def suggest(self, trial, target: Target, nfe_range: Optional[tuple[int, int]] = None
                ) -> Preset:
        """Sample a point through ``trial`` and return the preset it stands for."""
        r = self.ranges
        params = {}
        budget = target.budget
        if nfe_range is not None:
            budget = params["nfe"] = trial.suggest_int("nfe", *nfe_range)
        final_choices = [c for c in r["final_denoise"] if budget > 1 or not c]
        params["final_denoise"] = bool(trial.suggest_categorical("final_denoise", final_choices))
        for k in ("p1", "p2", "stop"):
            params[k] = trial.suggest_float(k, *_range(r, k))
        params["solver"] = trial.suggest_categorical(
            "solver", [solvers.canonical(s) for s in r["solver"]])
        # An explicit on/off switch rather than "t_aug = budget means off": FreeU is then off in
        # half the random start-up trials instead of 1/(budget+1), and TPE learns the switch
        # directly — FreeU values tuned for one UNet can ruin another.
        if target.freeu_ok and r["freeu"]:
            params["freeu"] = trial.suggest_categorical("freeu", [False, True])
            if params["freeu"]:
                params["t_aug"] = trial.suggest_int("t_aug", 0, budget - 1)
                params.update({k: trial.suggest_float(k, *_range(r, k)) for k in FREEU_KEYS})
                params["freeu_variant"] = trial.suggest_categorical(
                    "freeu_variant", list(r["freeu_variant"]))
        if r["guidance"] is not None:
            params["guidance"] = trial.suggest_float("guidance", *_range(r, "guidance"))
        return self.preset(params, target, name=f"trial {trial.number}")

    @staticmethod
    def preset(params: dict, target: Target, name: str = "trial") -> Preset:
        """The preset of a point given by its parameters (a trial's ``params``)."""
        budget = int(params.get("nfe", target.budget))
        final = bool(params.get("final_denoise", False))
        spec = {"name": "paper", "steps": budget - int(final), "p1": params["p1"],
                "p2": params["p2"], "stop": params["stop"], "final_denoise": final}
        plan = None
        if params.get("freeu") and all(k in params for k in FREEU_KEYS):
            t_aug = params.get("t_aug")
            if t_aug is not None and t_aug < budget:
                plan = FreeUPlan.from_start(budget, t_aug, FreeU(*(params[k] for k in FREEU_KEYS)),
                                            params.get("freeu_variant", "diffusers"))
        return Preset(name=name, family=target.family if target.family in presets.FAMILIES
                      else "any", sigmas=schedules.build(spec, target.table),
                      solver=params["solver"], freeu=plan,
                      guidance=float(params.get("guidance", target.guidance)), schedule=spec)

    # -- where a study starts ------------------------------------------------------------------
    def seed_trials(self, target: Target) -> list[tuple[str, dict]]:
        """The trials a study starts from, with why: the paper's preset nearest the budget as
        published, and its schedule alone (DPM++2M, no FreeU) — two informed points before the
        sampler's random start-up."""
        name = presets.nearest_paper_preset(target.family, target.budget)
        first = self._paper_params(name, target)
        plain = {**{k: v for k, v in first.items()
                    if k not in (*FREEU_KEYS, "t_aug", "freeu_variant")}, "solver": "dpmpp_2m"}
        if "freeu" in plain:
            plain["freeu"] = False
        seeds = [("paper preset", first)]
        if plain != first:
            seeds.append(("paper schedule, DPM++2M, no FreeU", plain))
        allowed = [solvers.canonical(x) for x in self.ranges["solver"]]
        return [(why, p) for why, p in seeds if p["solver"] in allowed]

    def _paper_params(self, name: str, target: Target) -> dict:
        """The paper preset's hyperparameters transplanted to this budget, as trial params.

        The sdxl-6 per-step FreeU plan has no t_aug form; its nearest one (on from step 1 with
        the first setting) stands in.
        """
        s = schedules.PAPER_SETTINGS[name]
        preset = presets.paper_preset(name)
        params = {"final_denoise": False, "p1": s["p1"], "p2": s["p2"],
                  "stop": schedules.equivalent_stop(s["steps"], s["M"], s["k"]),
                  "solver": preset.solver}
        if target.freeu_ok and self.ranges["freeu"]:
            plan = preset.freeu
            on = [i for i, st in enumerate(plan.steps) if st is not None] if plan else []
            params["freeu"] = bool(on) and on[0] < target.budget
            if params["freeu"]:
                params["t_aug"] = on[0]
                params.update(plan.steps[on[0]].as_dict())
                params["freeu_variant"] = plan.variant
        return self._clamp(params)

    def _clamp(self, params: dict) -> dict:
        """Enqueued params must lie inside the distributions, or Optuna rejects them."""
        out = dict(params)
        for k, v in params.items():
            if k in ("p1", "p2", "stop", *FREEU_KEYS):
                lo, hi = _range(self.ranges, k)
                out[k] = min(max(float(v), lo), hi)
        if out.get("freeu_variant") not in (None, *self.ranges["freeu_variant"]):
            out["freeu_variant"] = self.ranges["freeu_variant"][0]
        return out


def make_sampler(name: str, seed: int, multi_objective: bool):
    """The Optuna sampler that explores the space."""
    if name == "tpe":
        with warnings.catch_warnings():  # group=True is "experimental" but handles our conditional space
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True, n_startup_trials=8)
    if name == "cmaes":
        if multi_objective:
            raise ValueError("the cmaes sampler is single-objective; use tpe or random")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"--sampler must be tpe, cmaes, gp or random, got {name!r}")
