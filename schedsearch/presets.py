"""Presets: the one record of "a schedule to run" — explicit σ list, solver, FreeU plan, guidance,
how the σ list was built, and provenance. Trials, baselines, the recommended winner and exported
files are all presets.

A preset is JSON and nothing else: loading one parses and validates numbers and names, never
executes code. Shipped presets (the paper's settings and AYS) live in ``schedsearch/shipped_presets/``;
presets exported from studies go to the user preset folder (``$SCHEDSEARCH_PRESETS`` or
``~/.local/share/schedsearch/presets``) or any path.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import files, schedules, solvers
from .comfy import is_flow, manual_sigmas
from .freeu import FreeU, FreeUPlan
from .models import (FAMILIES as MODEL_FAMILIES, FLOW_FAMILIES, Model, default_guidance,
                     schedule_family)
from .noise import flow_t
from .version import __version__

SCHEMA = "schedsearch.preset/1"
SHIPPED_DIR = Path(__file__).with_name("shipped_presets")
FAMILIES = (*MODEL_FAMILIES, "any")   # the flow families (sd3, flux, gmm-flow, digits-flow) too

# The paper's solver and FreeU choices (docs/schedules.md, docs/freeu.md). Its code used the
# original FreeU.
_PAPER_FREEU = FreeU(1.1, 1.1, 0.9, 0.2)
_PAPER_SOLVERS = {"sd15-5": "dpmpp_1s", "sd15-6": "dpmpp_1s", "sd15-8": "dpmpp_2m",
                  "sdxl-6": "dpmpp_1s", "sdxl-8": "dpmpp_2m"}
_PAPER_GUIDANCE = {"sd15-5": 5.5, "sd15-6": 5.5, "sd15-8": 5.5, "sdxl-6": 7.5, "sdxl-8": 7.5}


def checked_guidance(value) -> float:
    """A CFG scale as every entry point takes it (preset, study config, search space, CLI flag),
    as a plain float: numpy's float32 is no JSON number. Above 100 is a typo, not a scale."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < 100):
        raise ValueError(f"guidance must be a number in (0, 100), got {value!r}")   # nan too
    return float(value)


def _paper_plan(name: str, steps: int) -> Optional[FreeUPlan]:
    if name in ("sd15-5", "sd15-6"):
        return FreeUPlan.from_start(steps, 0, _PAPER_FREEU, "original")
    if name == "sdxl-6":  # on for NFEs 2-4 and 6 (1-based), with stronger values at the last one
        a, b = _PAPER_FREEU, FreeU(1.3, 1.4, 0.9, 0.2)
        return FreeUPlan.per_step([None, a, a, a, None, b], "original")
    return None


@dataclass
class Preset:
    name: str
    family: str
    sigmas: torch.Tensor
    solver: str
    freeu: Optional[FreeUPlan] = None
    guidance: Optional[float] = None
    schedule: Optional[dict] = None          # how the σ list was built, when it was
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a preset needs a non-empty name")
        if self.family not in FAMILIES:
            raise ValueError(f"preset family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        self.sigmas = schedules.flow_explicit(self.sigmas)   # a flow model's list starts at ∞
        if (self.family not in FLOW_FAMILIES and self.family != "any"
                and float(self.sigmas[0]) == float("inf")):
            raise ValueError(f"family {self.family} is a DDPM-trained model's, whose σ list "
                             f"starts at a finite σ_max; this one starts at ∞ (a flow model's)")
        self.solver = solvers.canonical(self.solver)
        if self.freeu is not None and len(self.freeu.steps) != self.steps:
            raise ValueError(f"the FreeU plan has {len(self.freeu.steps)} steps but the σ list has "
                             f"{self.steps}")
        if self.guidance is not None:
            self.guidance = checked_guidance(self.guidance)
        if not isinstance(self.provenance, dict):
            raise ValueError(f"provenance must be a JSON object, got {self.provenance!r}")

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def nfe(self) -> int:
        return solvers.model_calls(self.solver, self.sigmas)

    def timesteps(self) -> list[float]:
        """The model timestep of every call's σ, for reading: on the SD table for a DDPM preset,
        1000·t (t = σ/(1+σ), ∞ → 1000) for a flow one, the 1000-step convention SD3 and FLUX
        pipelines use."""
        if is_flow(self):
            return [1000 * float(flow_t(float(s))) for s in self.sigmas[:-1]]
        return schedules.timesteps(self.sigmas).tolist()

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "family": self.family,
            "nfe": self.nfe,
            "sigmas": self.sigmas.tolist(),
            "timesteps": self.timesteps(),
            "solver": self.solver,
            "freeu": self.freeu.to_json() if self.freeu is not None and self.freeu.active else None,
            "guidance": self.guidance,
            "schedule": self.schedule,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data, origin: str = "preset") -> "Preset":
        if not isinstance(data, dict):
            raise ValueError(f"{origin}: a preset must be a JSON object")
        if "schema" not in data:
            raise ValueError(f"{origin}: not a schedsearch preset (no \"schema\": \"{SCHEMA}\"); "
                             f"make one with `schedsearch export` or copy a shipped one "
                             f"(`schedsearch presets show sd15-5 --format json`)")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{origin}: unknown preset schema {data.get('schema')!r} "
                             f"(this schedsearch reads {SCHEMA!r})")
        missing = [k for k in ("name", "family", "sigmas", "solver") if k not in data]
        if missing:
            raise ValueError(f"{origin}: missing {', '.join(missing)}")
        try:
            preset = cls(
                name=data["name"], family=data["family"], sigmas=data["sigmas"],
                solver=data["solver"],
                freeu=FreeUPlan.from_json(data["freeu"]) if data.get("freeu") else None,
                guidance=data.get("guidance"), schedule=data.get("schedule"),
                provenance={} if data.get("provenance") is None else data["provenance"])
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None
        if "nfe" in data and (type(data["nfe"]) is not int or data["nfe"] != preset.nfe):
            raise ValueError(f"{origin}: says nfe = {data['nfe']!r} but its σ list and solver "
                             f"spend {preset.nfe}")
        return preset

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically: a crash, or another worker saving the same name, never
        leaves a half-written preset."""
        return files.atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n")

    def replace(self, **changes) -> "Preset":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def freeu_text(self) -> str:
        """The FreeU plan in words, "off" without one: how every table, log line and MLflow run
        shows it."""
        return self.freeu.describe() if self.freeu is not None else "off"

    def comfy(self) -> str:
        """What ComfyUI's ManualSigmas takes: the σ list, or a flow preset's t list."""
        return manual_sigmas(self)


def user_dir() -> Path:
    return Path(os.environ.get("SCHEDSEARCH_PRESETS")
                or Path.home() / ".local" / "share" / "schedsearch" / "presets")


def read(path: str | os.PathLike) -> Preset:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"preset file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a preset file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text ({files.first_bad_byte(path)}); a preset is "
                         f"a JSON text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}); the preset file is corrupt") from None
    return Preset.from_json(data, origin=str(path))


def available() -> dict[str, Path]:
    """Preset name → file. A shipped name always means the shipped preset: a user file of the
    same name (written by hand, or by a schedsearch that let it shadow) is left out here and shown
    as ignored by ``schedsearch presets list``; it still loads by its path."""
    shipped_files = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.json"))}
    found = {}
    if user_dir().is_dir():
        found = {p.stem: p for p in sorted(user_dir().glob("*.json")) if p.is_file()}
    return {**found, **shipped_files}


# A clash is refused, not versioned: a preset's name is what users type (--preset NAME,
# load_preset, scripts), and a silent "<name>-2" would leave that name running the shipped or older
# preset while the user believes it runs the new one. Nothing is lost by refusing: the study keeps
# its own <out>/<study>.preset.json and its storage, and `schedsearch export --name` or --to copies
# it under a free name.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")   # what `--preset NAME` can find again


def plain_name(name: str) -> bool:
    """Whether ``name`` can name a file in a folder and be typed back: letters, digits and
    ``. _ + -``, not a path, not ending in .json (a preset's name; a study's, which its preset
    and run folder take)."""
    return isinstance(name, str) and bool(_FILE_NAME.fullmatch(name)) and not name.endswith(".json")


def user_path(preset: Preset) -> Path:
    """Where ``preset`` may be saved in the user preset folder under its name: refused (a
    ValueError saying what to do) for a shipped name, and for a user preset of that name that
    another study (or no study) made; the same study may replace its own earlier export."""
    if not plain_name(preset.name):
        raise ValueError(f"{preset.name!r} cannot name a preset in the user preset folder: use "
                         f"letters, digits and . _ + - (no path, no spaces, not ending in .json), "
                         f"e.g. schedsearch export --name my-sd15-5; or write it anywhere with "
                         f"--to FILE")
    path = user_dir() / f"{preset.name}.json"
    if (SHIPPED_DIR / path.name).is_file():
        raise ValueError(f"{preset.name!r} is the name of a shipped preset, which a user preset "
                         f"may not replace; choose another name (schedsearch export --name NAME)")
    if not path.exists():
        return path
    mine = {k: preset.provenance.get(k) for k in ("study", "storage")}
    try:
        theirs = {k: read(path).provenance.get(k) for k in mine}
        other = f"study {theirs['study']!r}" if theirs["study"] else "no study"
    except ValueError:
        theirs, other = {}, "an unreadable file"
    same = mine["study"] and theirs.get("study") == mine["study"] and (
        None in (theirs.get("storage"), mine["storage"]) or theirs["storage"] == mine["storage"])
    if not same:
        where = f" of {theirs['storage']}" if theirs.get("storage") else ""
        raise ValueError(f"a user preset named {preset.name!r} from {other}{where} is already at "
                         f"{path}; choose another name (schedsearch export --name NAME), or "
                         f"remove that file to replace it")
    return path


def load(name_or_path: str | os.PathLike) -> Preset:
    """A preset by name (shipped or user) or by path to a JSON file."""
    s = str(name_or_path)
    if s.endswith(".json") or os.sep in s or (os.altsep and os.altsep in s):
        return read(s)
    names = available()
    if s in names:   # a name wins over a file or folder of that name in the working directory
        return read(names[s])
    if os.path.exists(s):
        return read(s)
    raise ValueError(f"no preset named {s!r}; known presets: {', '.join(sorted(names))} "
                     f"(or give a path to a .json file; `schedsearch run` saves its winner under "
                     f"the study's name, e.g. digits-5nfe)")


def as_preset(preset, origin: str = "preset") -> Preset:
    """A ``Preset`` from what Python callers hand over: a Preset, a name or path (str or
    ``os.PathLike``), or the JSON object a preset file holds."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, dict):
        return Preset.from_json(preset, origin=origin)
    if isinstance(preset, (str, os.PathLike)):
        return load(preset)
    raise TypeError(f"expected a preset: a Preset, a preset name, a path to its .json file or its "
                    f"JSON object, got {type(preset).__name__}")


# -- shipped presets ------------------------------------------------------------------------------
def paper_preset(name: str) -> Preset:
    setting = schedules.PAPER_SETTINGS[name]
    return Preset(
        name=name, family=name.split("-")[0], sigmas=schedules.paper_preset(name),
        solver=_PAPER_SOLVERS[name], freeu=_paper_plan(name, setting["steps"]),
        guidance=_PAPER_GUIDANCE[name], schedule={"name": name},
        provenance={"source": "Hyperparameters are all you need (Li, 2025), as its code computes it",
                    "parameters": dict(setting)})


def ays_preset(family: str, steps: int) -> Preset:
    return Preset(
        name=f"ays-{family}-{steps}", family=family, sigmas=schedules.ays(steps, family),
        solver="dpmpp_2m", guidance=7.5 if family == "sd15" else 5.0,
        schedule={"name": "ays", "steps": steps, "family": family},
        provenance={"source": "Align Your Steps (Sabour et al., 2024), 10-step table"
                              + ("" if steps == 10 else ", log-linear interpolation")})


def shipped() -> list[Preset]:
    out = [paper_preset(n) for n in schedules.PAPER_SETTINGS]
    out += [ays_preset(f, n) for f in ("sd15", "sdxl") for n in (5, 6, 8, 10)]
    return out


def write_shipped(directory: Path = SHIPPED_DIR) -> list[Path]:
    """Regenerate the shipped preset files from code (``python -m schedsearch.presets``)."""
    return [p.save(directory / f"{p.name}.json") for p in shipped()]


def provenance(**extra) -> dict:
    return {"date": files.utc_now(), "schedsearch_version": __version__, **extra}


def nearest_paper_preset(family: str, budget: int) -> str:
    """The paper's preset for this model family whose NFE is nearest the budget (ties: smaller)."""
    prefix = schedule_family(family)
    names = [n for n in schedules.PAPER_SETTINGS if n.startswith(prefix)]
    return min(names, key=lambda n: (abs(schedules.PAPER_SETTINGS[n]["steps"] - budget),
                                     schedules.PAPER_SETTINGS[n]["steps"]))


# How far the first σ may lie above the table's σ_max: σ→t clamps there, so a rounded 14.7 for
# SD's 14.6146 runs as meant; a σ far above it (a broken or foreign file) makes garbage. A start
# below σ_max is the user's choice (distill --free-start, --sigma-max) and stays allowed; the
# lowest σ > 0 is the knots family's floor, half the table's σ_min.
SIGMA_MAX_TOLERANCE = 0.01


def kind(preset: Preset) -> Optional[str]:
    """The kind of model a preset was made for: "flow" (a flow-matching family, or a σ list from
    ∞), "ddpm" (a DDPM-trained family), or None for an "any" preset with a finite start, which
    either kind may run."""
    if is_flow(preset):
        return "flow"
    return None if preset.family == "any" else "ddpm"


_KIND_WORDS = {"flow": "a flow-matching model (σ from ∞, the model's time t)",
               "ddpm": "a DDPM-trained model (the Stable Diffusion noise table)"}


def fit(preset: Preset, model: Model, guidance: Optional[float] = None, *,
        allow_outside_table: bool = False) -> tuple[Preset, list[str]]:
    """The preset as it runs on ``model``: guidance from ``guidance``, else the preset's, else the
    model family's usual value; the FreeU plan dropped on a model without a UNet; σ outside the
    model's noise table refused unless ``allow_outside_table``; a preset made for the other kind
    of model (flow-matching vs DDPM) refused. Returns the fitted preset and notes for the user
    (the caller prints or warns)."""
    table = model.table
    made_for, runs = kind(preset), table.kind
    if made_for not in (None, runs):
        # the same σ means another noise level, time and input scaling on the other kind
        raise ValueError(f"preset {preset.name} ({preset.family}) was made for "
                         f"{_KIND_WORDS[made_for]}; {model.name} is {_KIND_WORDS[runs]}: use a "
                         f"preset made for a {model.family} model")
    hi, lo = table.sigma_max * (1 + SIGMA_MAX_TOLERANCE), schedules.KNOT_FLOOR * table.sigma_min
    positive = preset.sigmas[preset.sigmas > 0]
    first, last = float(positive[0]), float(positive[-1])
    if not allow_outside_table and (first > hi or last < lo):
        sigma, where = (first, "above") if first > hi else (last, "below")
        raise ValueError(f"preset {preset.name}: σ = {sigma:g} lies {where} {model.name}'s noise "
                         f"table, which runs from σ = {table.sigma_min:g} to {table.sigma_max:g} "
                         f"(usable: {lo:g} to {hi:g}); pass --allow-outside-table (Python: "
                         f"allow_outside_table=True) to run it anyway")
    notes = []
    if preset.family not in ("any", model.family):
        notes.append(f"preset {preset.name} was made for {preset.family} models; applying it to "
                     f"a {model.family} model")
    plan = preset.freeu
    if plan is not None and plan.active and model.unet is None:
        notes.append(f"{model.name} has no UNet: the preset's FreeU plan is skipped")
        plan = None
    g = guidance if guidance is not None else preset.guidance
    g = default_guidance(model.family) if g is None else g
    return preset.replace(freeu=plan, guidance=g), notes


if __name__ == "__main__":
    for path in write_shipped():
        print(path)
