"""The search space: its ranges, how a trial samples a point of it, and the preset that point is.

A point is a schedule family with its parameters, an end, a solver, a FreeU plan (switch, start
t_aug, b1, b2, s1, s2, variant) and, when opened, the guidance (docs/search.md):

* ``paper`` — the family of "Hyperparameters are all you need" (Li, 2025; docs/schedules.md):
  p1, p2, stop; ending at 0 spends one of the budget's calls on a final denoise;
* ``knots`` — a free-form σ list at exactly the budget (``schedules.knots``): σ_max, then the
  interior points as stick-breaking fractions ``knot_1 …`` of the log-σ range, ending at 0 or at
  a free σ_end > 0 (the last fraction). Every baseline is a point of it (``schedules.knot_fractions``).

On a flow-matching model (docs/flow.md) the space holds ``knots`` only, from σ = ∞
(``schedules.flow_knots``: ``knot_1`` places σ_1 in the model's time, the others break the log-σ
stick as above; the same number of fractions per budget), and no FreeU (no UNet); ``notes`` says
so, and refuses a space of the paper family alone. Every fraction, the first included, is refined
in logit space.

Every point spends exactly the budget. ``Space.suggest`` samples a point through an Optuna trial
and returns the ``Preset`` that is scored; ``Space.preset`` is the one function from parameters
to a preset, for new trials and stored ones alike. ``Space.refine`` is the local stage: offsets
around an incumbent's continuous parameters, searched by CMA-ES in a box whose centre is the
incumbent.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import optuna

from . import presets, schedules, solvers
from .freeu import FreeU, FreeUPlan
from .noise import NoiseTable
from .presets import Preset

FREEU_KEYS = ("b1", "b2", "s1", "s2")
FAMILIES = ("paper", "knots")
FLOW_AT_ONE_CALL = ("a flow-matching model has nothing to search at 1 model call, its only list "
                    "being σ = ∞ → 0: use a budget of 2 or more")
# One model call per step and exact on any σ list: the solvers a budget can be spent on.
SEARCHABLE_SOLVERS = ("dpmpp_1s", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1", "ipndm")
# Searched unless the config says otherwise. unipc_bh1 is opt-in: on digits at 5 NFE it led the
# global stage (AYS's σ list scores better with it than with unipc) but none of its refined lists
# won the validation round, so by default its warm starts would only take trials (docs/search.md).
SEARCHED_SOLVERS = ("dpmpp_1s", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm")

DEFAULT_SPACE = {
    "family": list(FAMILIES),
    "p1": [2.0, 14.0],          # paper: stop-ramp exponent (paper: 5, 7, 12)
    "p2": [0.6, 2.5],           # paper: t-grid exponent (paper: 1.2)
    "stop": [1.0, 8.0],         # paper: stopping index, real-valued (paper: 2, 3)
    "knots": [0.001, 0.999],    # knots: the range of every stick-breaking fraction
    "end": list(schedules.KNOT_ENDS),
    "solver": list(SEARCHED_SOLVERS),
    "freeu": True,              # search t_aug and the FreeU values (UNet models only)
    "b1": [1.0, 1.6], "b2": [1.0, 1.6], "s1": [0.2, 1.0], "s2": [0.1, 1.0],
    "freeu_variant": ["diffusers", "original"],
    "guidance": None,           # fixed per study; a [lo, hi] range opens it
}
# The local stage moves a knot fraction by up to REFINE_LOGIT in logit space and any other
# continuous parameter by up to a quarter of its range: the incumbent's neighbourhood.
REFINE_LOGIT = 1.5
REFINE_SHARE = 0.25


def did_you_mean(unknown, known) -> str:
    """A hint naming, for each unknown key close to a known one, the key it was likely meant as
    (' (did you mean trials for trails?)'), else '': a typo is the usual cause of an unknown key."""
    near = [f"{m[0]} for {k}" for k in sorted(unknown)
            if (m := difflib.get_close_matches(k, list(known), 1, 0.75))]
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _range(space: dict, key: str) -> tuple[float, float]:
    v = space[key]
    numbers = isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if not (numbers and v[0] <= v[1]):   # a NaN fails the comparison too
        raise ValueError(f"search space {key!r} must be [low, high], got {v!r}")
    return float(v[0]), float(v[1])


def _choices(space: dict, key: str, allowed) -> list:
    v = space[key]
    if not isinstance(v, (list, tuple)) or not v or any(c not in allowed for c in v):
        raise ValueError(f"search space {key!r} must be a non-empty list of "
                         f"{', '.join(map(str, allowed))}; got {v!r}")
    _once(key, v)
    return list(v)


def _once(key: str, choices) -> None:
    """A choice listed twice would be drawn twice as often and warm-started twice."""
    seen: set = set()
    again = next((c for c in choices if c in seen or seen.add(c)), None)
    if again is not None:
        raise ValueError(f"search space {key!r} lists {again} twice; give each choice once")


@dataclass(frozen=True)
class Target:
    """What every candidate of one study shares: the budget, the model's noise table and family,
    whether FreeU can act (the model has a UNet), and the study's guidance (every candidate's
    when it is not searched; the baselines', seeds' and warm starts' when it is)."""

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
            raise ValueError(f"unknown search-space keys: {', '.join(sorted(unknown))}"
                             f"{did_you_mean(unknown, DEFAULT_SPACE)}; "
                             f"known: {', '.join(DEFAULT_SPACE)}")
        self.ranges = r = {**DEFAULT_SPACE, **self.ranges}
        _choices(r, "family", FAMILIES)
        _choices(r, "end", schedules.KNOT_ENDS)
        _choices(r, "freeu_variant", ("diffusers", "original"))
        if _range(r, "p1")[0] <= 0 or _range(r, "p2")[0] <= 0:
            raise ValueError("search space: p1 and p2 must stay > 0")
        if _range(r, "stop")[0] < 1:
            raise ValueError("search space: stop must stay >= 1")
        lo, hi = _range(r, "knots")
        if not 0 < lo <= hi < 1:
            raise ValueError(f"search space: knot fractions must lie strictly inside (0, 1), "
                             f"got {r['knots']!r}")
        if not isinstance(r["freeu"], bool):   # [false] or "no" would be true, and search it
            raise ValueError(f"search space 'freeu' must be true (search FreeU) or false, got "
                             f"{r['freeu']!r}")
        for k in FREEU_KEYS:
            if _range(r, k)[0] <= 0:
                raise ValueError(f"search space: FreeU {k} must stay > 0 (diffusers treats 0 as off)")
        if not isinstance(r["solver"], (list, tuple)):   # a string would be read letter by letter
            raise ValueError(f"search space 'solver' must be a list, e.g. [unipc, dpmpp_2m], got "
                             f"{r['solver']!r}")
        names = [solvers.canonical(s) for s in r["solver"]] if r["solver"] else []
        bad = [s for s in names if s not in SEARCHABLE_SOLVERS]
        if not names or bad:
            raise ValueError(f"search space: solver must be a non-empty list of "
                             f"{', '.join(SEARCHABLE_SOLVERS)} (one model call per step), got "
                             f"{r['solver']!r}")
        _once("solver", names)
        r["solver"] = names
        if r["guidance"] is not None:
            ends = _range(r, "guidance")
            try:   # both ends must be guidance a preset accepts
                [presets.checked_guidance(x) for x in ends]
            except ValueError:
                raise ValueError(f"search space: guidance must lie inside (0, 100), got "
                                 f"{r['guidance']!r}") from None

    def families(self, target: Target) -> list[str]:
        """The families this model's space holds: the config's, less ``paper`` on a flow-matching
        model (no faithful flow analogue, docs/flow.md: its stop ramp runs up to σ_max = ∞ and its
        t-grid lives on SD's DDPM index)."""
        flow = target.table.kind == "flow"
        return [f for f in self.ranges["family"] if not (flow and f == "paper")]

    def notes(self, target: Target) -> list[str]:
        """What the study should say once about its space, one line each: a searched guidance,
        and what this model leaves out of the configured space; a space left empty is refused in
        one line before any work."""
        lines = []
        if self.ranges["guidance"] is not None:
            lo, hi = self.ranges["guidance"]
            # FID alone rewards less guidance (docs/search.md, the guidance interval): say that
            # a win over the baselines then measures the guidance as well as the schedule
            lines.append(f"guidance: searched in [{lo:g}, {hi:g}], the baselines run at "
                         f"{target.guidance:g}: FID alone prefers less guidance, so a win over "
                         f"them is the guidance's as much as the schedule's (docs/search.md)")
        if target.table.kind != "flow":
            return lines
        if target.budget < 2:
            raise ValueError(FLOW_AT_ONE_CALL)
        self.check_flow()
        if "paper" in self.ranges["family"]:
            lines.append("family paper: not searched (no faithful analogue on a flow-matching "
                         "model, docs/flow.md); the space holds knots from σ = ∞")
        if self.ranges["freeu"]:
            lines.append("FreeU: not searched (the model has no UNet)" if not target.freeu_ok
                         else "FreeU: not searched (a flow-matching model; this testbed's UNet "
                              "stands in for SD3's and FLUX's transformers, which have none)")
        return lines

    def freeu_searched(self, target: Target) -> bool:
        """FreeU is searched on DDPM models with a UNet. Not on flow-matching models: SD3 and FLUX
        have no UNet, and the digits-flow testbed, whose UNet stands in for their transformers,
        is searched as they are."""
        return bool(target.freeu_ok and self.ranges["freeu"]
                    and target.table.kind != "flow")

    def check_flow(self) -> None:
        """Refuse, in one line, a space a flow-matching model cannot search: the paper family
        alone, or unipc_bh1 (undefined from σ = ∞, docs/solvers.md)."""
        if "unipc_bh1" in self.ranges["solver"]:
            raise ValueError("search space: unipc_bh1 cannot start at σ = ∞ (its first corrector "
                             "weight h/2 is infinite there, docs/solvers.md); on a flow-matching "
                             "model remove it from space.solver (unipc is the bh2 variant)")
        if "knots" not in self.ranges["family"]:
            raise ValueError("search space: family [paper] has no faithful analogue on a "
                             "flow-matching model (docs/flow.md); use family: [knots], the "
                             "free-form σ list from σ = ∞")

    def check(self, budget: int) -> None:
        """Refuse a space that has nothing to search at this budget."""
        if "knots" in self.ranges["family"] and budget < 2:
            raise ValueError("search space: the knots family needs a budget of 2 or more (at 1 "
                             "there is no free σ); at budget 1 a DDPM model searches space: "
                             "{family: [paper], end: [sigma]}, the default there (and "
                             + FLOW_AT_ONE_CALL + ")")
        if "zero" in self.ranges["end"] and budget < 2:   # its trials would have no step left
            raise ValueError("search space: ending at 0 spends the only model call on the final "
                             "denoise, leaving the paper family no step; use end: [sigma] at "
                             "budget 1")

    def fewest_calls(self) -> int:
        """The smallest NFE every point of the space can spend, where the NFE is searched (the
        ``fid, nfe`` objectives): 1 only when the space passes at budget 1, else 2 — the paper
        family ending at 0 has no step left at 1 call, and Optuna's categorical choices are the
        same in every trial, so those trials would fail."""
        try:
            self.check(1)
        except ValueError:
            return 2
        return 1

    # -- the global stage ----------------------------------------------------------------------
    def suggest(self, trial, target: Target, nfe_range: Optional[tuple[int, int]] = None
                ) -> Preset:
        """Sample a point through ``trial`` and return the preset it stands for."""
        r = self.ranges
        params: dict = {}
        budget = target.budget
        if nfe_range is not None:
            budget = params["nfe"] = trial.suggest_int("nfe", *nfe_range)
        family = params["family"] = trial.suggest_categorical("family", self.families(target))
        # the same choices in every trial (Optuna's categorical space is fixed); the one empty
        # combination, the paper family ending at 0 with a single call, is refused by check()
        params["end"] = end = trial.suggest_categorical("end", r["end"])
        if family == "paper":
            for k in ("p1", "p2", "stop"):
                params[k] = trial.suggest_float(k, *_range(r, k))
        else:
            for i in range(1, budget + (end == "sigma")):
                params[f"knot_{i}"] = trial.suggest_float(f"knot_{i}", *_range(r, "knots"))
        params["solver"] = trial.suggest_categorical("solver", r["solver"])
        params.update(self._suggest_freeu(trial, target, budget))
        if r["guidance"] is not None:
            params["guidance"] = trial.suggest_float("guidance", *_range(r, "guidance"))
        return self.preset(params, target, name=f"trial {trial.number}")

    def _suggest_freeu(self, trial, target: Target, budget: int) -> dict:
        # An explicit on/off switch rather than "t_aug = budget means off": FreeU is then off in
        # half the random start-up trials instead of 1/(budget+1), and TPE learns the switch
        # directly — FreeU values tuned for one UNet can ruin another.
        r, params = self.ranges, {}
        if self.freeu_searched(target):
            params["freeu"] = trial.suggest_categorical("freeu", [False, True])
            if params["freeu"]:
                params["t_aug"] = trial.suggest_int("t_aug", 0, budget - 1)
                params.update({k: trial.suggest_float(k, *_range(r, k)) for k in FREEU_KEYS})
                params["freeu_variant"] = trial.suggest_categorical(
                    "freeu_variant", list(r["freeu_variant"]))
        return params

    @staticmethod
    def preset(params: dict, target: Target, name: str = "trial") -> Preset:
        """The preset of a point given by its parameters (a trial's ``params``; studies of
        schedsearch 0.1.0 stored the paper family only, with ``final_denoise``)."""
        budget = int(params.get("nfe", target.budget))
        end = params.get("end") or ("zero" if params.get("final_denoise") else "sigma")
        if params.get("family", "paper") == "paper":
            spec = {"name": "paper", "steps": budget - (end == "zero"), "p1": params["p1"],
                    "p2": params["p2"], "stop": params["stop"], "final_denoise": end == "zero"}
        else:
            n = budget - (end == "zero")
            spec = {"name": "knots", "end": end,
                    "fractions": [params[f"knot_{i}"] for i in range(1, n + 1)]}
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
        sampler's random start-up (when the space holds the paper family)."""
        if "paper" not in self.families(target):
            return []
        name = presets.nearest_paper_preset(target.family, target.budget)
        first = self._paper_params(name, target)
        plain = {**{k: v for k, v in first.items()
                    if k not in (*FREEU_KEYS, "t_aug", "freeu_variant")}, "solver": "dpmpp_2m"}
        if "freeu" in plain:
            plain["freeu"] = False
        seeds = [("paper preset", first)]
        if plain != first:
            seeds.append(("paper schedule, DPM++2M, no FreeU", plain))
        return [(why, self._at_study_guidance(p, target)) for why, p in seeds
                if p["solver"] in self.ranges["solver"] and p["end"] in self.ranges["end"]]

    def _at_study_guidance(self, params: dict, target: Target) -> dict:
        """A seed or warm start with the guidance opened runs at the study's guidance (the
        baselines'), or the nearest end of the range, not at a random draw: then a warm start
        still reproduces its baseline, and the winner is never worse than it on the search subset,
        whenever the range holds the study's guidance."""
        if self.ranges["guidance"] is None:
            return params
        lo, hi = _range(self.ranges, "guidance")
        return {**params, "guidance": min(max(float(target.guidance), lo), hi)}

    def _paper_params(self, name: str, target: Target) -> dict:
        """The paper preset's hyperparameters transplanted to this budget, as trial params.

        The sdxl-6 per-step FreeU plan has no t_aug form; its nearest one (on from step 1 with
        the first setting) stands in.
        """
        s = schedules.PAPER_SETTINGS[name]
        preset = presets.paper_preset(name)
        params = {"family": "paper", "end": "sigma", "p1": s["p1"], "p2": s["p2"],
                  "stop": schedules.equivalent_stop(s["steps"], s["M"], s["k"]),
                  "solver": preset.solver}
        params.update(self._freeu_params(preset.freeu, target))
        return self._clamp(params)

    def _freeu_params(self, plan: Optional[FreeUPlan], target: Target) -> dict:
        if not self.freeu_searched(target):
            return {}
        on = [i for i, st in enumerate(plan.steps) if st is not None] if plan else []
        if not on or on[0] >= target.budget:
            return {"freeu": False}
        return {"freeu": True, "t_aug": on[0], **plan.steps[on[0]].as_dict(),
                "freeu_variant": plan.variant}

    def warm_params(self, preset: Preset, solver: str, target: Target) -> Optional[dict]:
        """A preset's σ list as a point of the knots family, run with ``solver`` and no FreeU
        (None when the space cannot hold it: another family only, an end it excludes, or a
        fraction outside the knots range). On a flow model the inverse is ``flow_knot_fractions``
        with the floor ``knots`` uses; a list that does not start at ∞ (OptimalSteps) is not in
        the family."""
        r = self.ranges
        floor = schedules.KNOT_FLOOR * target.table.sigma_min
        try:
            if target.table.kind == "flow":
                fractions, end = schedules.flow_knot_fractions(preset.sigmas, sigma_floor=floor)
            else:
                fractions, end = schedules.knot_fractions(
                    preset.sigmas, sigma_max=target.table.sigma_max, sigma_floor=floor)
        except ValueError:
            return None
        lo, hi = _range(r, "knots")
        if "knots" not in self.families(target) or end not in r["end"] or solver not in r["solver"] \
                or not all(lo <= f <= hi for f in fractions):
            return None
        params = {"family": "knots", "end": end,
                  **{f"knot_{i}": f for i, f in enumerate(fractions, 1)}, "solver": solver}
        if self.freeu_searched(target):
            params["freeu"] = False
        return self._at_study_guidance(params, target)

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

    # -- the local stage -----------------------------------------------------------------------
    def refine(self, trial, incumbent: dict, target: Target) -> tuple[Preset, dict]:
        """Sample offsets ``d_<name>`` in [-1, 1] for each continuous parameter of the
        incumbent's point (its categorical choices stay) and return the preset and the absolute
        parameters. z = 0 is the incumbent itself: CMA-ES's default start, the box centre."""
        params = dict(incumbent)
        for key in self.continuous(incumbent):
            z = trial.suggest_float(f"d_{key}", -1.0, 1.0)
            params[key] = self._moved(key, incumbent[key], z)
        return self.preset(params, target, name=f"trial {trial.number}"), params

    def continuous(self, params: dict) -> list[str]:
        keys = [k for k in params if k in ("p1", "p2", "stop") or k.startswith("knot_")]
        if params.get("freeu"):
            keys += [k for k in FREEU_KEYS if k in params]
        if self.ranges["guidance"] is not None and "guidance" in params:
            keys.append("guidance")
        return keys

    def _moved(self, key: str, value: float, z: float) -> float:
        if key.startswith("knot_"):
            lo, hi = _range(self.ranges, "knots")
            logit = math.log(value / (1 - value)) + REFINE_LOGIT * z
            return min(max(1 / (1 + math.exp(-logit)), lo), hi)
        lo, hi = _range(self.ranges, key)
        return min(max(value + z * REFINE_SHARE * (hi - lo), lo), hi)


def make_sampler(name: str, seed: int, multi_objective: bool):
    """The Optuna sampler of the global stage."""
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


def refine_sampler(seed: int):
    """The local stage's sampler: CMA-ES from the box centre (the incumbent), from its first
    trial on (no random start-up point: the global stage was the exploration)."""
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0,
                                        warn_independent_sampling=False)
