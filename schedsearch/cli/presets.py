"""``schedsearch presets`` and ``schedsearch export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna

from .. import comfy, slots
from ..locks import check_existing_sqlite
from ..presets import SHIPPED_DIR, available, load, read, user_dir, user_path
from ..report import preset_from_study
from . import options


def register(sub) -> None:
    p = options.command(
        sub, "presets", help="list or show presets (shipped, exported, or a file)",
        description="Presets are plain JSON: an explicit σ list, solver, FreeU plan, guidance and "
                    "provenance. Shipped: the paper's settings and AYS.",
        examples=["schedsearch presets list", "schedsearch presets show sd15-5",
                  "schedsearch presets show sd15-5 --format comfy",
                  "schedsearch presets show gmm-flow-5nfe --format comfy   # a flow preset (from "
                  "`schedsearch run --model gmm-flow --budget 5`): its t list (∞ → 1.0)",
                  "schedsearch presets show sd15-5 --format comfy-workflow > sd15-5.workflow.json"])
    psub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = psub.add_parser("list", help="list known presets")
    ls.set_defaults(handler=list_presets)
    show = psub.add_parser("show", help="show one preset")
    show.add_argument("name", help="preset name or path to a .json file")
    show.add_argument("--format", choices=["table", "json", "comfy", "comfy-workflow"],
                      default="table",
                      help="table (default), json, comfy (a σ list for ManualSigmas; for a "
                           "flow-matching preset its t list, ∞ → 1.0) or comfy-workflow (a "
                           "ComfyUI API-format workflow on stdout; where ComfyUI cannot run the "
                           "preset exactly, the reasons go to stderr; SD1.x/2.x/XL presets only)")
    show.add_argument("--checkpoint", default=None,
                      help="comfy-workflow: the checkpoint file name in ComfyUI's models folder "
                           "(default model.safetensors)")
    show.add_argument("--prompt", default=None, help="comfy-workflow: the positive prompt")
    show.set_defaults(handler=show_preset)
    p.set_defaults(handler=lambda a: (p.print_help(), 2)[1])

    e = options.command(
        sub, "export", help="export a study's best (or any) trial as a preset",
        description="Rebuild a trial's preset from the study storage alone (no model needed).",
        examples=["schedsearch export --name mine --out schedsearch-runs/digits-5nfe",
                  "schedsearch export --study s1 --storage postgresql://u:p@host/db --name s1 "
                  "--trial 12 --to s1.json"])
    e.add_argument("--study", help="study name (default: the storage's only study)")
    e.add_argument("--name", required=True, help="name of the preset")
    e.add_argument("--out", help="the study's output folder (its study.db)")
    e.add_argument("--storage", help="the study's storage URL (instead of --out)")
    e.add_argument("--trial", type=int,
                   help="trial number (default: the study's ★ recommendation: its winner, or "
                        "the baseline no searched schedule beat)")
    e.add_argument("--to", help="write here (default: the user preset folder)")
    e.add_argument("--format", choices=["json", "comfy"], default="json",
                   help="also print the preset as JSON (default) or a ComfyUI σ list")
    e.set_defaults(handler=export)


def list_presets(args) -> int:

    print(f"{'name':<28} {'family':<7} {'NFE':>3}  {'solver':<9} {'FreeU':<6} source")
    for name, path in sorted(available().items()):
        try:
            p = read(path)
        except ValueError as exc:
            print(f"{name:<28} (unreadable: {exc})")
            continue
        src = "shipped" if path.parent == SHIPPED_DIR else str(path)
        print(f"{name:<28} {p.family:<7} {p.nfe:>3}  {p.solver:<9} "
              f"{'on' if p.freeu is not None else 'off':<6} {src}")
    # a shipped name always means the shipped preset; say so for user files that carry one
    folder = user_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if (SHIPPED_DIR / path.name).is_file():
            print(f"{path.stem:<28} (ignored: the shipped {path.stem} wins; rename {path} to use "
                  f"it by name, or give its path)")
    return 0


def print_preset(preset, fmt: str, **extra) -> None:
    if fmt == "json":
        print(json.dumps(preset.to_json(), indent=2))
    elif fmt == "comfy":
        print(comfy.manual_sigmas(preset))   # a flow preset: its t list, ComfyUI's "sigma"
    elif fmt == "comfy-workflow":

        kwargs = {k: v for k, v in extra.items() if v is not None}
        workflow, notes = comfy.export(preset, **kwargs)
        print(json.dumps(workflow, indent=2))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        d = preset.to_json()
        # a searched guidance has every digit in the JSON; four say what it is
        guidance = "the model's default" if preset.guidance is None else f"{preset.guidance:.4g}"
        print(f"{preset.name}: {preset.family}, {preset.nfe} NFE, {preset.solver}, guidance "
              f"{guidance}")
        print(f"  σ: {', '.join(f'{s:.4f}' for s in d['sigmas'])}")
        if comfy.is_flow(preset):   # the model's own time t = σ/(1+σ) and its timestep 1000·t
            print(f"  t: {comfy.flow_t_string(preset.sigmas)} (timestep 1000·t)")
        else:
            print(f"  t: {', '.join(f'{t:.2f}' for t in d['timesteps'])}")
        print(f"  FreeU: {preset.freeu_text()}")
        if preset.provenance:
            print(f"  provenance: {json.dumps(preset.provenance)[:400]}")


def show_preset(args) -> int:

    given = options.given_flags(args, "checkpoint", "prompt")
    if given and args.format != "comfy-workflow":   # they would be dropped without a word
        raise ValueError(f"{' and '.join(given)} only go{'es' * (len(given) == 1)} into a "
                         f"workflow: add --format comfy-workflow, or drop "
                         f"{'them' if len(given) > 1 else 'it'}")
    print_preset(load(args.name), args.format, checkpoint=args.checkpoint or "model.safetensors",
                 prompt=args.prompt)
    return 0


def only_study(storage_url: str) -> str:
    """The one study a storage holds (its stage studies, ``<name>:baselines`` and
    ``<name>:refine…``, belong to it); with several, a line that lists them."""
    names = sorted(n for n in optuna.get_all_study_names(slots.make_storage(storage_url))
                   if ":" not in n)
    if len(names) != 1:
        raise ValueError(f"{slots.redact(storage_url)} holds "
                         + (f"{len(names)} studies ({', '.join(names)}): pick one with --study"
                            if names else "no study"))
    return names[0]


def export(args) -> int:

    if not args.storage and not args.out:
        raise ValueError("give the study's --out folder or its --storage URL")
    if args.storage and args.out:
        raise ValueError("give the study's --out folder or its --storage URL, not both")
    storage = args.storage or f"sqlite:///{(Path(args.out) / 'study.db').resolve()}"
    if not args.storage and not (Path(args.out) / "study.db").is_file():
        raise FileNotFoundError(f"no study.db in {args.out}; is it a schedsearch run folder?")
    if args.storage:
        check_existing_sqlite(args.storage, "--storage", "study.db")
    if args.study and ":" in args.study:   # <name>:refine, <name>:baselines
        whole = args.study.split(":")[0]
        raise ValueError(f"{args.study} is a stage of study {whole}: export --study {whole} "
                         f"(--trial N picks any trial of either stage)")
    preset = preset_from_study(storage, args.study or only_study(storage), args.name, args.trial)
    if args.to:
        path = preset.save(Path(args.to))
    else:
        target = user_path(preset)   # refuses a shipped name or another study's preset
        try:
            path = preset.save(target)
        except OSError as exc:
            raise ValueError(f"cannot write to the user preset folder {user_dir()} "
                             f"({exc.strerror}): point $SCHEDSEARCH_PRESETS at a folder you can "
                             f"write to, or give --to FILE") from None
    print_preset(preset, args.format)
    print(f"wrote {path}", file=sys.stderr)
    return 0
