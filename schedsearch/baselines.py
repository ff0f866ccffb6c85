"""The baselines every study is compared against, on the same prompts and seeds as its trials.
On a DDPM model: Karras DPM++2M at the budget and at 20 steps, the paper's preset nearest the
budget, AYS interpolated to the budget. On a flow-matching model: its own default schedule with
Euler (as its pipeline samples it) at the budget and at 28 and 50 steps, and the OptimalSteps FLUX
table interpolated to the budget with Euler (as ComfyUI's node is used). On both: the
teacher-distilled GITS and OSS schedules at the budget. Each is a ``Preset``, like a trial's
candidate; which keys apply to which model is ``config.BASELINES``."""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

from . import gits, oss, presets, prompts, schedules, teacher
from .models import schedule_family
from .presets import Preset


def build(ctx, keys, echo: Callable[[str], None] = print) -> dict[str, Preset]:
    """key → preset for the requested baseline keys. ``ctx``: the study's ``Context``."""
    budget, table, g = ctx.config.budget, ctx.model.table, ctx.guidance

    def make(name, sigmas, solver, spec, freeu=None, **provenance):
        return Preset(name=name, family=ctx.family, sigmas=sigmas, solver=solver, freeu=freeu,
                      guidance=g, schedule=spec, provenance=provenance)

    flow = table.kind == "flow"
    out = (_flow(keys, budget, table, make) if flow else _ddpm(ctx, keys, budget, table, make))
    distilled = [k for k in ("gits", "oss") if k in keys]
    if distilled:
        out.update(distilled_baselines(ctx, distilled, make, echo))
    return out


# The step counts of the flow models' own default runs: 28 is SD3's and FLUX.1-dev's pipeline
# default, 50 diffusers' generic one; ``flow28``/``flow50`` are the model's schedule run as its
# users run it, the reference a few-step schedule has to approach.
FLOW_REFERENCE_STEPS = {"flow28": 28, "flow50": 50}


def _flow(keys, budget: int, table, make) -> dict:
    """The model's default schedule with Euler — what its diffusers pipeline runs
    (FlowMatchEulerDiscreteScheduler) — at the budget and at 28 and 50 steps, and OptimalSteps'
    FLUX table interpolated to the budget, with Euler: the sampler of the example workflows that
    came with ComfyUI's node (its authors: "we don't support some other samplers")."""
    out = {}
    for key, steps in (("flow", budget), *FLOW_REFERENCE_STEPS.items()):
        if key in keys:
            spec = {"name": "flow", "steps": steps}
            out[key] = make(f"flow default euler @{steps}", schedules.build(spec, table),
                            "euler", spec)
    if "optimalsteps" in keys:
        spec = {"name": "optimalsteps", "steps": budget, "model_type": "flux"}
        out["optimalsteps"] = make(f"optimalsteps (flux) euler @{budget}",
                                   schedules.build(spec, table), "euler", spec)
    return out


def _ddpm(ctx, keys, budget: int, table, make) -> dict:
    """Karras DPM++2M at the budget and at 20 steps, the paper's preset, AYS."""
    out = {}
    if "karras" in keys:
        out["karras"] = make(f"karras dpm++2m @{budget}", schedules.karras(
            budget, table.sigma_min, table.sigma_max), "dpmpp_2m",
            {"name": "karras", "steps": budget, "rho": 7.0})
    if "karras20" in keys:
        out["karras20"] = make("karras dpm++2m @20", schedules.karras(
            20, table.sigma_min, table.sigma_max), "dpmpp_2m",
            {"name": "karras", "steps": 20, "rho": 7.0})
    if "paper" in keys:
        name = presets.nearest_paper_preset(ctx.family, budget)
        p = presets.paper_preset(name)
        label = f"paper {name}" + ("" if ctx.freeu_ok or p.freeu is None else
                                   " (no FreeU: model has no UNet)")
        out["paper"] = make(label, schedules.paper_preset(name, table=table), p.solver,
                            {"name": name}, p.freeu if ctx.freeu_ok else None)
    if "ays" in keys:
        fam = schedule_family(ctx.family)
        out["ays"] = make(f"ays ({fam}) @{budget}", schedules.ays(budget, fam), "dpmpp_2m",
                          {"name": "ays", "steps": budget, "family": fam})
    return out


def distill_block(prompt_seed: int) -> int:
    """The prompt seed of GITS/OSS's own teacher images: the block after the study's."""
    return (prompt_seed + 1) % prompts.MAX_PROMPT_SEED


def distill_prompts(source: str, cfg) -> prompts.PromptSet:
    """The prompts (and seeds) of GITS and OSS's teacher images: the study's prompt source,
    from the seed block after the study's."""
    return prompts.load(source, cfg.distill_samples, distill_block(cfg.prompt_seed),
                        caption_column=cfg.caption_column,
                        why=f"distill_samples {cfg.distill_samples}, GITS and OSS's teacher "
                            f"images; lower it in the study config, leave gits and oss out of "
                            f"--baselines, or repeat lines in the file")


def distilled_baselines(ctx, keys, make, echo) -> dict[str, Preset]:
    """GITS and OSS at the budget, distilled from one set of teacher trajectories on their own
    prompts and seeds (seed block ``prompt_seed + 1``: disjoint from the search and held-out seeds,
    so the distilled schedules are not fitted to the images they are scored on; past the last
    block it wraps to block 0, just as disjoint)."""
    cfg, budget, g = ctx.config, ctx.config.budget, ctx.guidance
    pset = distill_prompts(ctx.prompt_source, cfg)
    grid = teacher.TeacherGrid(steps=cfg.teacher_steps)
    if budget >= grid.steps:
        echo(f"  (no GITS/OSS: the budget {budget} is not below the teacher's {grid.steps} steps)")
        return {}
    with tqdm(total=grid.steps * len(pset), desc="teacher", unit="img·call", leave=False,
              disable=None) as bar:
        tea = teacher.trajectories(ctx.model, pset.prompts, pset.seeds, guidance=g, grid=grid,
                                   batch_size=cfg.batch_size, progress=bar)
    echo(f"  teacher: {grid.steps} steps × {len(pset)} samples "
         f"({'cached' if tea.calls == 0 else f'{tea.calls} calls per sample'})")
    out = {}
    if "gits" in keys:
        d = gits.search(tea, budget)
        out["gits"] = make(f"gits @{budget}", d.sigmas, "dpmpp_1s",
                           {"name": "explicit", "sigmas": d.sigmas.tolist()},
                           distilled="gits", grid_indices=d.provenance["grid_indices"])
    if "oss" in keys:
        with tqdm(desc="oss", unit="state·call", leave=False, disable=None) as bar:
            d = oss.search(ctx.model, tea, budget, batch_size=max(cfg.batch_size, 256), progress=bar)
        out["oss"] = make(f"oss @{budget}", d.sigmas, "dpmpp_1s",
                          {"name": "explicit", "sigmas": d.sigmas.tolist()},
                          distilled="oss", grid_indices=d.provenance.get("grid_indices"))
    return out
