"""The study config: every setting of a study, from ``studies/*.yaml`` and CLI flags, validated
before any work starts."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

from .files import first_bad_byte
from .metrics.paired import MIN_RESAMPLES
from .models import BUILTIN, is_flow
from .presets import checked_guidance
from .prompts import SEED_STRIDE, check_prompt_seed
from .space import FLOW_AT_ONE_CALL, Space, did_you_mean

# The baselines per kind of model, and every key in the order the comparison lists them. A DDPM
# model (SD1.x/2.x/XL, digits, gmm) is compared with Karras, the paper's preset and AYS; a
# flow-matching one (SD3, FLUX, the flow testbeds) with its own default schedule at the budget and
# at the step counts its pipelines default to (28: SD3's and FLUX-dev's; 50: diffusers'), and the
# OptimalSteps FLUX table; GITS and OSS are distilled from a teacher on either kind.
SD_BASELINES = ("karras", "karras20", "paper", "ays", "gits", "oss")
FLOW_BASELINES = ("flow", "flow28", "flow50", "optimalsteps", "gits", "oss")
BASELINES = {"ddpm": SD_BASELINES, "flow": FLOW_BASELINES}
ALL_BASELINES = ("karras", "karras20", "paper", "ays", "flow", "flow28", "flow50", "optimalsteps",
                 "gits", "oss")


def applicable_baselines(requested: Optional[list], kind: str) -> list[str]:
    """The baseline keys a study on a model of this kind ("ddpm" or "flow") runs: every one that
    applies when none were named, else the named ones, refused in one line when one does not
    apply (naming those that do)."""
    allowed = BASELINES[kind]
    if requested is None:
        return list(allowed)
    bad = [b for b in requested if b not in allowed]
    if bad:
        what = "flow-matching" if kind == "flow" else "DDPM-trained (Stable Diffusion table)"
        raise ValueError(f"baseline{'s' * (len(bad) > 1)} {', '.join(bad)} "
                         f"{'do' if len(bad) > 1 else 'does'} not apply to a {what} model; "
                         f"the ones that do: {', '.join(allowed)}")
    return list(requested)


# A budget of B calls is a free-form σ list with B − 1 or B free knots, and CMA-ES needs more
# samples per generation and more generations as the dimension grows: at 8 NFE on digits, 48
# trials left the local stage three generations from the best known schedule. 20, not 16, since
# the first model call of a trial is shared (sampler.FirstCalls): the default 5-NFE study takes
# the time 80 trials took before (docs/search.md).
TRIALS_PER_NFE = 20
MIN_TRIALS = 48


def default_trials(budget: int) -> int:
    """A study's trials when the config does not say: 20 per model call, at least 48."""
    return max(MIN_TRIALS, TRIALS_PER_NFE * budget)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one clause: what it found, and where (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


# the keys a diffusers pipeline takes and a testbed refuses (the CLI's Stable Diffusion flags)
SD_ONLY = ("height", "width", "vae", "model_config", "eval_batch")


@dataclass
class StudyConfig:
    """Everything a study needs; ``studies/*.yaml`` files hold these keys (CLI flags override)."""

    model: str = "digits"
    budget: int = 5
    guidance: Optional[float] = None        # None: the model family's usual value
    prompts: Optional[str] = None           # None: the testbed's classes; a file for SD models
    caption_column: str = "caption"
    prompt_seed: int = 0
    n_search: int = 200
    n_heldout: int = 200
    checkpoints: Optional[list] = None      # growing subset sizes for pruning; None: n/4, n/2, n
    batch_size: int = 200
    trials: Optional[int] = None            # None: default_trials(budget)
    refine: float = 0.6                     # share of the first 48 trials in the local (CMA-ES) stage
    refine_starts: int = 2                  # at most this many CMA-ES runs share the local stage
    refine_margin: float = 0.05             # ... each from a trial within this share of the best's FID
    warm_start: int = 2                     # best same-NFE baselines re-run as knots trials
    rerank: int = 3                         # best trials re-scored on fresh seeds before one wins
    validation_sets: int = 4                # fresh seed sets (n_search each) the contenders meet
    sampler: str = "tpe"                    # the global stage's sampler
    seed: int = 0
    pruner: str = "median"
    objectives: list = field(default_factory=lambda: ["fid"])
    space: dict = field(default_factory=dict)
    baselines: Optional[list] = None        # None: every baseline that applies to the model
    teacher_steps: int = 100
    distill_samples: int = 16
    heldout_sets: int = 1                   # disjoint held-out seed sets the winner is checked on
    bootstrap: int = 1000                   # resamples of the paired bootstrap CIs
    ref_stats: Optional[str] = None
    extractor: Optional[str] = None
    inception: Optional[str] = None
    clip: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    height: Optional[int] = None            # height .. eval_batch: Stable Diffusion models only
    width: Optional[int] = None
    vae: Optional[str] = None               # a replacement VAE (folder or hub id)
    model_config: Optional[str] = None      # a single-file checkpoint's diffusers config folder
    eval_batch: Optional[int] = None        # images per UNet call

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1 (model calls per image), got {self.budget!r}")
        if self.trials is None:
            self.trials = default_trials(self.budget)
        self._check_counts()
        if self.guidance is not None:
            self.guidance = checked_guidance(self.guidance)
        if not (isinstance(self.refine, (int, float)) and 0 <= self.refine < 1):
            raise ValueError(f"refine (the share of trials in the local stage) must lie in [0, 1), "
                             f"got {self.refine!r}")
        if isinstance(self.refine_margin, bool) or not isinstance(self.refine_margin, (int, float)) \
                or not 0 <= self.refine_margin < float("inf"):
            raise ValueError(f"refine_margin (how far behind the best a local run's start may be, "
                             f"as a share of its FID) must be a number >= 0, got "
                             f"{self.refine_margin!r}")
        for key in ("warm_start", "rerank"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {v!r}")
        if self.baselines is not None and (isinstance(self.baselines, str)
                                           or not isinstance(self.baselines, (list, tuple))):
            raise ValueError(f"baselines must be a list of keys (or null: every baseline that "
                             f"applies to the model), got {self.baselines!r}")
        bad = [b for b in self.baselines or () if b not in ALL_BASELINES]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {', '.join(ALL_BASELINES)}")
        self._fit_space()
        objs = list(self.objectives)
        if objs[:1] != ["fid"] or not set(objs) <= {"fid", "nfe", "clip"} or len(objs) > 2:
            raise ValueError(f"objectives must be [fid], [fid, nfe] or [fid, clip] (FID first: "
                             f"--objectives fid,nfe), got {objs}")
        if "clip" in objs and not self.clip:
            raise ValueError("the clip objective needs local CLIP weights: set clip: /path/to/clip")
        if self.pruner not in ("median", "none"):
            raise ValueError(f"pruner must be median or none, got {self.pruner!r}")
        if self.checkpoints is not None:
            cps = sorted(int(c) for c in self.checkpoints)
            if not cps or cps[0] < 2 or cps[-1] > self.n_search:
                raise ValueError(f"checkpoints must lie in [2, n_search={self.n_search}], got {cps}")

    def _check_types(self) -> None:
        """The keys whose wrong YAML type (a number for a path, a string for a list) would
        otherwise surface as a traceback, or be read character by character."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a testbed name, hub id or path, got {self.model!r}")
        for key in ("prompts", "ref_stats", "extractor", "inception", "clip", "device", "dtype",
                    "caption_column", "vae", "model_config"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key} must be a string, got {v!r}")
            if v is not None and not v.strip():   # '' read as "not given": the default, silently
                raise ValueError(f"{key} is empty: give it a value, or leave it out for its "
                                 f"default")
        # a YAML section left empty (every line under it commented out) reads as null
        if self.space is None:
            self.space = {}
        if self.objectives is None:
            self.objectives = ["fid"]
        if not isinstance(self.space, dict):
            raise ValueError(f"space must be a mapping of keys to ranges or choices, e.g. "
                             f"{{family: [knots], solver: [unipc]}}, got {self.space!r}")
        for key, example in (("objectives", "[fid, nfe]"), ("checkpoints", "[50, 100]")):
            v = getattr(self, key)
            if v is not None and not isinstance(v, (list, tuple)):
                raise ValueError(f"{key} must be a list, e.g. {example}, got {v!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) for c in self.checkpoints or ()):
            raise ValueError(f"checkpoints must be integers, got {self.checkpoints!r}")
        for key in SD_ONLY:
            v = getattr(self, key)
            if v is None:
                continue
            if key in ("height", "width") and (isinstance(v, bool) or not isinstance(v, int)
                                               or v < 8):
                raise ValueError(f"{key} must be an integer number of pixels, got {v!r}")
            if key == "eval_batch" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"eval_batch must be an integer >= 0 (0: off), got {v!r}")
            if self.model in BUILTIN:
                raise ValueError(f"{key}: for Stable Diffusion models only, not the {self.model} "
                                 f"testbed")

    def _check_counts(self) -> None:
        """Image and trial counts, and the seeds they take."""
        for key in ("n_search", "n_heldout", "batch_size", "trials", "heldout_sets", "bootstrap",
                    "validation_sets", "refine_starts", "teacher_steps", "distill_samples"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        if self.bootstrap < MIN_RESAMPLES:   # else refused by the held-out check, after the trials
            raise ValueError(f"bootstrap must be >= {MIN_RESAMPLES} resamples (the ends of a 95% "
                             f"interval rest on fewer than 3 draws below that), got "
                             f"{self.bootstrap}")
        check_prompt_seed(self.prompt_seed)
        s = self.seed   # Optuna's samplers seed numpy, which takes 0..2**32 - 1
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 32:
            raise ValueError(f"seed (the search's) must be an integer in 0..{2 ** 32 - 1}, got {s!r}")
        for key in ("n_search", "n_heldout"):   # else every trial fails, after the baselines
            if getattr(self, key) < 2:
                raise ValueError(f"{key} must be >= 2 (FID needs two images at least), got "
                                 f"{getattr(self, key)}")
        # validation seeds start half a seed block above the search seeds (context.py)
        if (self.validation_sets + 1) * self.n_search + self.heldout_sets * self.n_heldout > SEED_STRIDE // 2:
            raise ValueError(f"n_search × (validation_sets + 1) + n_heldout × heldout_sets must "
                             f"stay within {SEED_STRIDE // 2} images, so that validation and "
                             f"held-out seeds never meet")

    def _fit_space(self) -> None:
        """The space at this budget and, for a testbed, its kind of model; its ranges are checked
        now, not at trial 1."""
        if self.budget == 1 and self.model in BUILTIN and is_flow(self.model):
            raise ValueError(FLOW_AT_ONE_CALL)
        if self.budget == 1:
            # one model call leaves the knots family no free σ and the paper family no step
            # before a final denoise: the default space is the paper family stopping at a σ > 0
            # (what the user names is checked as named)
            self.space = {"family": ["paper"], "end": ["sigma"], **(self.space or {})}
        if self.model in BUILTIN:   # a testbed's kind is known now; other models' once loaded
            applicable_baselines(self.baselines, "flow" if is_flow(self.model) else "ddpm")
            if is_flow(self.model):
                Space(dict(self.space)).check_flow()
        Space(dict(self.space)).check(self.budget)  # the ranges now, not at trial 1

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "StudyConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"study config {str(path)!r} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text ({first_bad_byte(path)}); a study config "
                             f"is a YAML text file") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a study config is a mapping of keys to values")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown study config keys: {', '.join(sorted(unknown))}"
                             f"{did_you_mean(unknown, sorted(known))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def stages(self) -> tuple[int, int]:
        """Trials of the global stage and of the local one (none for a multi-objective study:
        CMA-ES refines one objective; none with ``refine: 0``): ``refine`` of the first 48, and all
        the others, are local."""
        if len(self.objectives) > 1 or self.refine == 0:
            return self.trials, 0
        # ``refine`` splits the first MIN_TRIALS; every trial beyond them is local: the global
        # stage's work (seeds, warm starts, the sampler's start-up) does not grow with the budget,
        # the local stage's dimension does. With more global trials at 5 NFE on digits, one
        # study's incumbent became a lucky paper-family point whose basin was worse.
        base = min(self.trials, MIN_TRIALS)
        # at least one global trial: the local stage refines the global stage's best, and a
        # study of one trial (a quick try) should run the paper's preset, not a random point
        local = min(int(round(base * self.refine)) + self.trials - base, self.trials - 1)
        return self.trials - local, local

    def local_runs(self, runs: int) -> list[int]:
        """The local stage's trials split evenly between ``runs`` CMA-ES runs (how many starts
        the global stage left, at most ``refine_starts``), earlier runs taking the odd ones; runs
        with no trial left are dropped."""
        _, local = self.stages()
        k = max(1, min(runs, self.refine_starts))
        return [n for n in (local // k + (r < local % k) for r in range(k)) if n]

    def resolved_checkpoints(self) -> list[int]:
        if self.checkpoints:
            return sorted({int(c) for c in self.checkpoints} | {self.n_search})
        n = self.n_search
        return sorted({max(2, n // 4), max(2, n // 2), n})

    # the keys that define what a study measures; resuming with other values is refused
    IDENTITY = ("model", "budget", "guidance", "prompts", "caption_column", "prompt_seed",
                "n_search", "n_heldout", "objectives", "space", "ref_stats", "extractor",
                "height", "width", "vae")


def default_study_name(config: StudyConfig) -> str:
    tag = Path(config.model.rstrip("/")).name.replace(".safetensors", "")
    # a plain name: it names the run folder, the preset and the study's stages (NAME:refine)
    tag = re.sub(r"[^A-Za-z0-9._+-]+", "-", tag).strip("-._+") or "model"
    return f"{tag}-{config.budget}nfe"


def config_json(config: StudyConfig) -> dict:
    """The config as plain JSON values (what the study stores and compares on resume)."""
    return json.loads(json.dumps(asdict(config), default=str))


def identity(config: StudyConfig) -> dict:
    """The keys that define what a study measures; resuming with other values is refused."""
    data = config_json(config)
    return {k: data[k] for k in StudyConfig.IDENTITY}
