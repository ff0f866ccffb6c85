"""The command-line options every command shares, declared once, and the one function that turns
a preset or schedule flags into the preset a command samples.

One name per idea, in every command: ``--model``, ``--device``, ``--dtype``, ``--batch-size``,
``--guidance``, ``--prompts`` (a prompt file or ``classes:K``), ``--prompt-seed`` (the prompt set's
seed: image i gets seed ``prompt_seed·10⁶ + i``), the schedule flags, ``--solver``, the FreeU flags
(``--freeu``, ``--t-aug``, ``--freeu-variant``) and ``--preset``. ``--seed`` exists only in ``run``,
where it seeds the search.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

from .. import models, schedules, solvers
from ..config import SD_ONLY
from ..freeu import DEFAULTS, FreeU, FreeUPlan
from ..models import schedule_family
from ..noise import FlowTable, NoiseTable, is_flow_config
from ..presets import Preset, checked_guidance, fit, load
from ..schedules import NAMES, PAPER_SETTINGS
from ..solvers import SOLVERS

DTYPES = ["auto", "fp32", "fp16", "bf16"]
MODEL_HELP = ("digits (default), gmm, digits-flow, gmm-flow (flow-matching testbeds), a hub id, a "
              "diffusers folder (SD1.x/2.x/XL, SD3/SD3.5, FLUX.1) or a .safetensors checkpoint")


def command(sub, name: str, *, help: str, description: str, examples: list[str] = ()):
    """A subcommand parser whose --help ends with worked examples. The description is wrapped
    here because the raw formatter (which keeps the examples' line breaks) would not."""
    epilog = "Examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(name, help=help, description=textwrap.fill(description, 79),
                          epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def model(p, default: str | None = "digits") -> None:
    """--model, --device, --dtype."""
    p.add_argument("--model", default=default, help=MODEL_HELP)
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="model dtype (default: fp16 on CUDA, fp32 on CPU)")


def sd_model(p) -> None:
    """The options that only Stable Diffusion models take."""
    sd = p.add_argument_group("Stable Diffusion models")
    sd.add_argument("--height", type=int, help="image height (default: the model's native size)")
    sd.add_argument("--width", type=int, help="image width (default: the model's native size)")
    sd.add_argument("--vae", help="a replacement VAE (folder or hub id), e.g. an fp16-fix SDXL VAE")
    sd.add_argument("--model-config", metavar="FOLDER",
                    help="for a single .safetensors checkpoint: a diffusers folder of the same "
                         "architecture giving its configs (needed offline)")
    sd.add_argument("--eval-batch", type=int,
                    help="images per UNet call (default 1 on CPU, 8 on CUDA, 4 above 768²); a "
                         "fixed value keeps each image independent of the batch it is sampled in")


def load_model(args):
    """The model the flags name (SD-only flags refused for the testbeds)."""

    kwargs = {k: getattr(args, k, None) for k in SD_ONLY if getattr(args, k, None) is not None}
    if args.model in models.BUILTIN and kwargs:
        flags = ", ".join("--" + k.replace("_", "-") for k in kwargs)
        raise ValueError(f"{flags}: for Stable Diffusion models only, not the {args.model} testbed")
    if "model_config" in kwargs:
        kwargs["config"] = kwargs.pop("model_config")
    return models.load(args.model, device=args.device, dtype=args.dtype, **kwargs)


def prompts(p, *, default_seed: int | None = 0) -> None:
    """--prompts, --prompt-seed and --caption-column."""
    p.add_argument("--prompts", metavar="SOURCE",
                   help="a prompt file (one per line, a COCO captions .json, a .csv) or classes:K "
                        "for a testbed's class labels 0..K-1 in turn (default: the testbed's "
                        "classes)")
    p.add_argument("--prompt-seed", type=int, default=default_seed,
                   help="the prompt set's seed: image i gets seed PROMPT_SEED·10⁶ + i "
                        f"(default {default_seed if default_seed is not None else 0})")
    p.add_argument("--caption-column", default=None, help="CSV caption column (default caption)")


def _guidance_value(text: str) -> float:
    """A CFG scale as presets and study configs take it, checked where it is typed (teacher,
    oss and gits have no preset to check it later)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return checked_guidance(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 100), got {text}") from None


def guidance(p, *, first: str = "") -> None:
    """``first``: where the command's guidance comes from before the family default, if anywhere
    (a preset, a config file)."""
    p.add_argument("--guidance", type=_guidance_value,
                   help=f"CFG scale (default: {first + ', else ' if first else ''}per model "
                        "family: digits and digits-flow 4, gmm and gmm-flow 3, SD1.x/2.x 5.5, "
                        "SDXL 7.5, SD3 7; FLUX's distilled guidance 3.5)")


def batch_size(p, default: int | None) -> None:
    p.add_argument("--batch-size", type=int, default=default,
                   help=f"images per batch (default {default})" if default else
                   "images per batch")


def progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def extractor(p) -> None:
    """The feature space of FID and KID."""
    p.add_argument("--extractor", choices=["inception", "digits", "identity"],
                   help="feature space (default: digits / identity for the testbeds, else "
                        "inception)")
    p.add_argument("--inception", metavar="PATH",
                   help="clean-fid's inception-2015-12-05.pt (default: $SCHEDSEARCH_INCEPTION, "
                        "then /tmp/inception-2015-12-05.pt)")


def scoring(p) -> None:
    """Where FID's reference statistics and feature extractor come from, and CLIP score."""
    p.add_argument("--ref-stats", metavar="FILE",
                   help="reference statistics (schedsearch refstats); the testbeds have their own")
    extractor(p)
    p.add_argument("--clip", metavar="DIR", help="a local CLIP folder: also report the CLIP score")


# -- schedules, solvers, FreeU, presets ------------------------------------------------------------
def schedule(p, *, steps_help: str = "number of steps (model calls of a 1-call solver)") -> None:
    """The flags of a schedule family (see ``schedules.build``)."""
    p.add_argument("--steps", type=int, help=steps_help)
    p.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                   help="ays: which published table (default: the model's own, "
                        "else sd15)")
    p.add_argument("--p1", type=float, default=None,
                   help="paper: exponent of the σ-ramp that picks the stopping level (default 7)")
    p.add_argument("--p2", type=float, default=None,
                   help="paper: exponent of the t-grid (default 1.2)")
    p.add_argument("--stop", type=float, default=None,
                   help="paper: stopping index, a number >= 1 (default 3; integers are the paper's)")
    p.add_argument("--M", type=int, default=None, help="paper: explicit ramp length (with --k)")
    p.add_argument("--k", type=int, default=None, help="paper: explicit ramp point (with --M)")
    p.add_argument("--final-denoise", action="store_true",
                   help="paper/presets: append σ = 0, one more model call x = D(x, σ_stop)")
    p.add_argument("--rho", type=float, default=None, help="karras: ρ (default 7)")
    p.add_argument("--sigma-min", type=float, default=None, help="karras/logsnr: lowest σ > 0")
    p.add_argument("--sigma-max", type=float, default=None, help="karras/logsnr: highest σ")
    p.add_argument("--sigmas", default=None,
                   help="explicit: comma-separated σ list, descending, optional final 0 (alone, it "
                        "selects the explicit schedule)")
    p.add_argument("--fractions", default=None,
                   help="knots: comma-separated stick-breaking fractions in (0, 1) "
                        "(docs/search.md; alone, it selects the knots schedule)")
    p.add_argument("--end", choices=["zero", "sigma"], default=None,
                   help="knots: a last step to σ = 0 (default) or stop at the last fraction's σ")
    p.add_argument("--noise-config", default=None, metavar="FILE",
                   help="a diffusers scheduler_config.json for a model whose noise table is not "
                        "Stable Diffusion's, an SD3/FLUX FlowMatch one included (default: the "
                        "model's own table)")
    p.add_argument("--mu", type=float, default=None,
                   help="with a dynamically shifted FlowMatch config (FLUX): its shift μ "
                        "(default: the one diffusers computes at 1024², 4096 latent tokens)")


def sampling(p, *, default_schedule: str, default_steps: int) -> None:
    """--schedule and its flags, --solver, the FreeU flags and --preset."""

    p.add_argument("--schedule", metavar="NAME", default=None,
                   help=f"{', '.join(NAMES)} (default {default_schedule} with --steps "
                        f"{default_steps})")
    schedule(p)
    p.add_argument("--solver", default=None,
                   help=f"{', '.join(SOLVERS)} (default dpmpp_2m; DPM++2M, DPM++1S, DDIM accepted)")
    p.add_argument("--freeu", default=None, metavar="B1,B2,S1,S2",
                   help="turn FreeU on with these values (e.g. 1.1,1.1,0.9,0.2) or a named "
                        "default: sd14, sd15, sd21, sdxl, paper (UNet models only; default off)")
    p.add_argument("--t-aug", type=int, default=None, metavar="STEP",
                   help="first 0-based step with FreeU on (the paper's t_aug; default 0)")
    p.add_argument("--freeu-variant", choices=["diffusers", "original"], default=None,
                   help="diffusers' enable_freeu (default) or the FreeU authors' original patch, "
                        "which the paper used")
    p.add_argument("--preset", metavar="NAME|FILE",
                   help="a preset (schedsearch presets list, or a .json file): its σ list, "
                        "solver, FreeU plan and guidance, instead of --schedule/--solver/--freeu")
    p.add_argument("--allow-outside-table", action="store_true",
                   help="run a σ list that reaches above the model's noise table (its σ_max) "
                        "or below half its σ_min; refused by default")
    guidance(p, first="the preset's")
    p.set_defaults(default_schedule=default_schedule, default_steps=default_steps)


MAX_LIST = 1_000_000


def int_list(text: str, what: str, *, unique: str = "") -> list[int]:
    """'0-7', '0,3,5', '0-3,10' → integers in the order given (seeds, class labels). ``unique``:
    what one value is ("seed"), when each may be given only once."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise ValueError(f"{what} must be integers or ranges a-b, e.g. 0-7 or 0,3,5; "
                             f"got {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{what}: the range {part!r} runs backwards")
        if len(out) + hi - lo + 1 > MAX_LIST:   # a typo such as 0-99999999999 built the list
            raise ValueError(f"{what} asks for {len(out) + hi - lo + 1:,} values; at most "
                             f"{MAX_LIST:,} (one image each)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError(f"{what} is empty: give at least one, e.g. 0-7")
    if unique and len(set(out)) < len(out):
        seen: set = set()
        again = next(v for v in out if v in seen or seen.add(v))
        raise ValueError(f"{what} lists {unique} {again} twice: give each {unique} once")
    return out


def parse_freeu(text: str):

    if text in DEFAULTS:
        return DEFAULTS[text]
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--freeu takes four numbers b1,b2,s1,s2 (e.g. 1.1,1.1,0.9,0.2) or one of "
                         f"{', '.join(DEFAULTS)}; got {text!r}")
    return FreeU(*values)


# Which schedules read each schedule flag. A flag given to any other would be dropped without a
# word (``score --sigmas`` used to score Karras), so it is refused instead.
_FLAG_OWNERS = {
    "sigmas": ("explicit",), "fractions": ("knots",), "end": ("knots",),
    "p1": ("paper",), "p2": ("paper",), "stop": ("paper",), "M": ("paper",), "k": ("paper",),
    "final_denoise": ("paper", *PAPER_SETTINGS), "rho": ("karras",),
    "sigma_min": ("karras", "logsnr"), "sigma_max": ("karras", "logsnr"), "family": ("ays",),
}


def given_flags(args, *dests: str) -> list[str]:
    """The flags among ``dests`` that the user gave, as typed (--t-aug for t_aug): not at their
    None default, not an unset switch (0 is a value: --t-aug 0). Flags a command is about to
    refuse rather than ignore."""
    return ["--" + d.replace("_", "-") for d in dests
            if getattr(args, d, None) is not None and getattr(args, d) is not False]


def _check_schedule_flags(args, name: str) -> None:
    for dest, owners in _FLAG_OWNERS.items():
        if name in owners:
            continue
        for flag in given_flags(args, dest):
            where = ("paper schedule and the paper's presets" if dest == "final_denoise"
                     else " and ".join(owners) + " schedule" + "s" * (len(owners) > 1))
            raise ValueError(f"{flag} applies to the {where}, not to {name!r}; drop {flag}"
                             + (f" or use the {owners[0]} schedule" if len(owners) == 1 else ""))
    if args.steps is not None and name in ("explicit", "knots"):
        raise ValueError(f"--steps does not apply to the {name} schedule: its list sets the "
                         f"steps; drop --steps")


def schedule_spec(args, name: str, model_family: str | None = None) -> dict:
    """The schedule spec (see ``schedules.build``) that the flags describe."""
    _check_schedule_flags(args, name)
    if name in PAPER_SETTINGS:
        spec = {"name": name, "final_denoise": args.final_denoise}
        if args.steps is not None:
            spec["steps"] = args.steps
        return spec
    if name == "explicit":
        if not args.sigmas:
            raise ValueError("schedule 'explicit' needs --sigmas, e.g. --sigmas 14.6,3.0,0.5,0")
        try:
            values = [float(v) for v in args.sigmas.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--sigmas must be comma-separated numbers, got {args.sigmas!r}") from None
        return {"name": "explicit", "sigmas": values}
    if name == "knots":
        if not args.fractions:
            raise ValueError("schedule 'knots' needs --fractions, e.g. --fractions 0.2,0.15,0.3")
        try:
            values = [float(v) for v in args.fractions.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--fractions must be comma-separated numbers, got "
                             f"{args.fractions!r}") from None
        return {"name": "knots", "fractions": values, "end": args.end or "zero"}
    if args.steps is None:
        raise ValueError(f"schedule {name!r} needs --steps N")
    spec = {"name": name, "steps": args.steps}
    if name == "paper":
        spec.update(p1=7.0 if args.p1 is None else args.p1,
                    p2=1.2 if args.p2 is None else args.p2, final_denoise=args.final_denoise)
        if args.M is not None or args.k is not None:
            spec.update(M=args.M, k=args.k)
            if args.stop is not None:
                spec["stop"] = args.stop
        else:
            spec["stop"] = 3 if args.stop is None else args.stop
    elif name == "ays":
        spec["family"] = args.family or schedule_family(model_family or "sd15")
    elif name in ("karras", "logsnr"):
        if name == "karras":
            spec["rho"] = 7.0 if args.rho is None else args.rho
        for key in ("sigma_min", "sigma_max"):
            if getattr(args, key) is not None:
                spec[key] = getattr(args, key)
    return spec


# FLUX's latent tokens at 1024² (a 128² latent in 2×2 patches): the shift its pipeline uses there
FLUX_1024_TOKENS = 4096


DDPM_CONFIG_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                    "trained_betas")


def noise_table(args):
    """The noise table named by --noise-config, or None (use the model's own)."""
    if not args.noise_config:
        if getattr(args, "mu", None) is not None:
            raise ValueError("--mu is the shift of a dynamically shifted FlowMatch config: give "
                             "it with --noise-config FILE, or drop it")
        return None
    try:
        with open(args.noise_config, encoding="utf-8-sig") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a scheduler config: its JSON is not an object")
        if is_flow_config(cfg):   # SD3/FLUX: σ lists from ∞ (docs/flow.md)
            # a dynamic shift is FLUX's, whose pipeline also brings its own t-grid
            flux = bool(cfg.get("use_dynamic_shifting"))
            if getattr(args, "mu", None) is not None and not flux:
                raise ValueError(f"--mu applies to a dynamically shifted config "
                                 f"(use_dynamic_shifting: true); this one has a fixed shift "
                                 f"{cfg.get('shift', 1.0)}: drop --mu")
            return FlowTable.from_config(cfg, mu=args.mu, image_seq_len=FLUX_1024_TOKENS,
                                         grid="flux" if flux else "scheduler")
        if not set(cfg) & set(DDPM_CONFIG_KEYS):   # {} or some other JSON: not the SD default
            raise ValueError(f"not a scheduler config: it sets none of "
                             f"{', '.join(DDPM_CONFIG_KEYS)}")
        return NoiseTable.from_config(cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"--noise-config {args.noise_config!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--noise-config {args.noise_config}: not a readable scheduler config "
                         f"JSON ({exc})") from None
    except (ValueError, TypeError) as exc:   # a value of the config: name the file it is in
        raise ValueError(f"--noise-config {args.noise_config}: {exc}") from None


def freeu_plan(args, steps: int):
    """The FreeU plan of --freeu, --t-aug and --freeu-variant (None without --freeu; the other two
    alone are refused, not ignored)."""
    if not args.freeu:
        given = given_flags(args, "t_aug", "freeu_variant")
        if given:
            verb = "only applies" if len(given) == 1 else "only apply"
            raise ValueError(f"{' and '.join(given)} {verb} with FreeU on: add --freeu "
                             f"B1,B2,S1,S2 (e.g. --freeu sd15)")
        return None
    t_aug = 0 if args.t_aug is None else args.t_aug
    if t_aug < 0:
        raise ValueError(f"--t-aug must be >= 0, got {t_aug}")
    if t_aug >= steps:   # FreeU would never turn on: surely not what --freeu asked for
        raise ValueError(f"--t-aug {t_aug} is past the last step: the schedule has {steps} "
                         f"step{'s' if steps != 1 else ''} (0-based 0..{steps - 1})")
    return FreeUPlan.from_start(steps, t_aug, parse_freeu(args.freeu),
                                args.freeu_variant or "diffusers")


def preset_from_args(args, model):
    """The preset a command samples: ``--preset``, or the schedule, solver and FreeU flags; fitted
    to the model (guidance resolved, FreeU dropped without a UNet — with a note on stderr)."""

    if args.preset:
        clash = given_flags(args, "schedule", *_FLAG_OWNERS, "steps", "solver", "freeu", "t_aug",
                            "freeu_variant")
        if clash:
            raise ValueError(f"--preset sets the schedule, solver and FreeU plan; drop "
                             f"{', '.join(clash)}")
        preset = load(args.preset)
    else:
        # a σ list or knot fractions name their schedule when --schedule does not
        name = (args.schedule or ("explicit" if args.sigmas else None)
                or ("knots" if args.fractions else None) or args.default_schedule)
        if name not in NAMES:
            raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(NAMES)}")
        if args.steps is None and name not in (*schedules.PAPER_SETTINGS, "explicit", "knots"):
            args.steps = args.default_steps
        spec = schedule_spec(args, name, model.family)
        sigmas = schedules.build(spec, noise_table(args) or model.table)
        plan = freeu_plan(args, len(sigmas) - 1)
        preset = Preset(name=name, family="any", sigmas=sigmas,
                        solver=solvers.canonical(args.solver or "dpmpp_2m"), freeu=plan,
                        schedule=spec)
    preset, notes = fit(preset, model, args.guidance,
                        allow_outside_table=getattr(args, "allow_outside_table", False))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return preset
