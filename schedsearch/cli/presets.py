"""``schedsearch presets`` and ``schedsearch export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("presets", help="list or show presets (shipped, exported, or a file)",
                       description="Presets are plain JSON: an explicit σ list, solver, FreeU plan, "
                                   "guidance and provenance. Shipped: the paper's settings and AYS.")
    psub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = psub.add_parser("list", help="list known presets")
    ls.set_defaults(handler=list_presets)
    show = psub.add_parser("show", help="show one preset")
    show.add_argument("name", help="preset name or path to a .json file")
    show.add_argument("--format", choices=["table", "json", "comfy"], default="table")
    show.set_defaults(handler=show_preset)
    p.set_defaults(handler=lambda a: (p.print_help(), 2)[1])

    e = sub.add_parser("export", help="export a study's best (or any) trial as a preset",
                       description="Rebuild a trial's preset from the study storage alone.")
    e.add_argument("--study", required=True, help="study name")
    e.add_argument("--name", required=True, help="name of the preset")
    e.add_argument("--out", help="the study's output folder (its study.db)")
    e.add_argument("--storage", help="the study's storage URL (instead of --out)")
    e.add_argument("--trial", type=int, help="trial number (default: the best)")
    e.add_argument("--to", help="write here (default: the user preset folder)")
    e.add_argument("--format", choices=["json", "comfy"], default="json",
                   help="also print the preset as JSON (default) or a ComfyUI σ list")
    e.set_defaults(handler=export)


def list_presets(args) -> int:
    from ..presets import SHIPPED_DIR, available, read

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
    return 0


def print_preset(preset, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(preset.to_json(), indent=2))
    elif fmt == "comfy":
        print(preset.comfy())
    else:
        d = preset.to_json()
        print(f"{preset.name}: {preset.family}, {preset.nfe} NFE, {preset.solver}, guidance "
              f"{preset.guidance}")
        print(f"  σ: {', '.join(f'{s:.4f}' for s in d['sigmas'])}")
        print(f"  t: {', '.join(f'{t:.2f}' for t in d['timesteps'])}")
        print(f"  FreeU: {preset.freeu.describe() if preset.freeu is not None else 'off'}")
        if preset.provenance:
            print(f"  provenance: {json.dumps(preset.provenance)[:400]}")


def show_preset(args) -> int:
    from ..presets import load

    print_preset(load(args.name), args.format)
    return 0


def export(args) -> int:
    from ..presets import user_dir
    from ..study import preset_from_study

    if not args.storage and not args.out:
        raise ValueError("give the study's --out folder or its --storage URL")
    storage = args.storage or f"sqlite:///{(Path(args.out) / 'study.db').resolve()}"
    if not args.storage and not (Path(args.out) / "study.db").is_file():
        raise FileNotFoundError(f"no study.db in {args.out}; is it a schedsearch run folder?")
    preset = preset_from_study(storage, args.study, args.name, args.trial)
    path = preset.save(Path(args.to) if args.to else user_dir() / f"{args.name}.json")
    print_preset(preset, args.format)
    print(f"wrote {path}", file=sys.stderr)
    return 0
