"""Flow presets outside schedsearch's own sampler: in diffusers' SD3 and FLUX pipelines (tiny,
offline, CPU) and as ComfyUI's ManualSigmas t list.

Parity: a pipeline with ``PresetScheduler`` — or, for Euler presets, diffusers' own
``FlowMatchEulerDiscreteScheduler`` with the preset's t list — reproduces ``schedsearch.generate``
on the same initial noise to 1e-5 (relative, latents). The pipeline's sample is x_t; the solver
state is y = x_t/(1−t); the model output is a velocity.
"""

import contextlib
import json
import math

import pytest
import torch

import schedsearch
from schedsearch import comfy, presets, schedules
from schedsearch.diffusers import (PresetScheduler, flow_euler_scheduler, flow_euler_sigmas,
                                   freeu_plan)
from schedsearch.models.diffusers_flow import from_flow_pipeline, pack, unpack
from schedsearch.presets import Preset
from schedsearch.sampler import initial_noise
from tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

PROMPTS, SEEDS = ["a red cat", "a dog on a hill"], [3, 11]
SIZE = dict(height=64, width=64)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def pipes():
    out = {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline()}
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def flow_preset(pipe, solver, end="zero", family=None):
    """A knots list from ∞ on the pipeline's own table (ending at 0, or at σ = 0.05)."""
    table = from_flow_pipeline(pipe, **SIZE).table
    spec = {"name": "knots", "fractions": [0.3, 0.2, 0.4, 0.5] + ([0.6] if end == "sigma" else []),
            "end": end}
    g = 4.0 if type(pipe).__name__ == "StableDiffusion3Pipeline" else 3.5
    return Preset(name=f"flow-{solver}-{end}", family=family or "any",
                  sigmas=schedules.build(spec, table), solver=solver, guidance=g, schedule=spec)


def run_pipeline(pipe, preset, **kwargs):
    """The pipeline from our sampler's noise at ∞ (ε, packed for FLUX), its latents unpacked."""
    eps = initial_noise((16, 8, 8), SEEDS, math.inf)
    flux = type(pipe).__name__ == "FluxPipeline"
    out = pipe(PROMPTS, **SIZE, guidance_scale=preset.guidance, latents=(pack(eps) if flux
                                                                           else eps).clone(),
               output_type="latent", **kwargs).images
    return unpack(out, 8, 8) if flux else out


@contextlib.contextmanager
def transformer_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def ours(pipe, preset):
    return schedsearch.generate(pipe, preset, PROMPTS, SEEDS, output="samples", **SIZE).latents


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc"])
def test_preset_scheduler_equals_generate(pipes, kind, solver):
    pipe = pipes[kind]
    original = pipe.scheduler
    preset = flow_preset(pipe, solver)
    want = ours(pipe, preset)
    try:
        pipe.scheduler = PresetScheduler.from_preset(preset, original.config)
        assert pipe.scheduler.flow and not pipe.scheduler.config.use_flow_sigmas
        with freeu_plan(pipe, preset):   # no plan, no UNet: a no-op
            got = run_pipeline(pipe, preset, num_inference_steps=pipe.scheduler.nfe)
    finally:
        pipe.scheduler = original
    assert rel(got, want) < 1e-5
    # the comparison can tell another solver apart
    other = ours(pipe, preset.replace(solver="dpmpp_3m" if solver != "dpmpp_3m" else "euler"))
    assert rel(got, other) > 1e-4


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_match_euler_with_the_t_list_is_enough_for_euler_presets(pipes, kind):
    """No PresetScheduler: diffusers' own Euler, its shift turned off, on the preset's t list."""
    pipe = pipes[kind]
    original = pipe.scheduler
    preset = flow_preset(pipe, "euler")
    t = flow_euler_sigmas(preset)
    assert t[0] == 1.0 and len(t) == preset.nfe
    assert t[1:] == [s / (1 + s) for s in preset.sigmas[1:-1].tolist()]
    try:
        pipe.scheduler = flow_euler_scheduler(original.config)
        got = run_pipeline(pipe, preset, sigmas=t)
    finally:
        pipe.scheduler = original
    assert rel(got, ours(pipe, preset)) < 1e-5
    with pytest.raises(ValueError, match="runs Euler steps to σ = 0; this one is dpmpp_2m"):
        flow_euler_sigmas(preset.replace(solver="dpmpp_2m"))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_euler_scheduler_from_a_preset_schedulers_config(pipes, kind):
    """README's Euler path after a PresetScheduler was installed: the t list still runs (a
    use_flow_sigmas key in the config made FluxPipeline drop it and run its 28 default steps)."""
    pipe = pipes[kind]
    original = pipe.scheduler
    preset = flow_preset(pipe, "euler")
    try:
        pipe.scheduler = PresetScheduler.from_preset(preset, original.config)
        pipe.scheduler = flow_euler_scheduler(pipe.scheduler.config)
        with transformer_calls(pipe) as calls:
            got = run_pipeline(pipe, preset, sigmas=flow_euler_sigmas(preset))
    finally:
        pipe.scheduler = original
    assert len(calls) == preset.nfe
    assert rel(got, ours(pipe, preset)) < 1e-5


def test_swapping_back_restores_the_pipelines_scheduler(pipes):
    """FLUX's shift and dynamic shifting survive PresetScheduler and back, as they survive a swap
    between stock schedulers."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipes["flux"]
    before = dict(pipe.scheduler.config)
    assert before["shift"] != 1.0 and before["use_dynamic_shifting"]
    sched = PresetScheduler.from_preset(flow_preset(pipe, "euler"), before)
    back = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    for key in ("shift", "use_dynamic_shifting", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len"):
        assert back.config[key] == before[key], key
    assert not back.config.get("use_flow_sigmas")


def test_flux_sigmas_default_is_ignored_a_users_is_refused(pipes):
    """FluxPipeline passes np.linspace(1, 1/n, n) when given no sigmas=: that runs the preset; a
    user's own sigmas= is refused, not dropped."""
    pipe = pipes["flux"]
    original = pipe.scheduler
    preset = flow_preset(pipe, "dpmpp_2m")
    try:
        pipe.scheduler = PresetScheduler.from_preset(preset, original.config)
        with transformer_calls(pipe) as calls:
            run_pipeline(pipe, preset, num_inference_steps=preset.nfe)
        assert len(calls) == preset.nfe
        with pytest.raises(ValueError, match="do not pass timesteps= or sigmas="):
            run_pipeline(pipe, preset, num_inference_steps=preset.nfe,
                         sigmas=[1.0, 0.8, 0.5, 0.2])
        with pytest.raises(ValueError, match="num_inference_steps=5, not 28"):
            run_pipeline(pipe, preset)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("family", ["any", "sd3"])
def test_a_finite_start_is_refused_in_flow_pipelines(pipes, family):
    """A flow pipeline hands the model its unit noise at the first call; generate starts at
    x_t = t0·ε. From a finite σ0 the two would differ (by 5% here), so the pipeline refuses."""
    pipe = pipes["sd3"]
    preset = flow_preset(pipe, "euler", family=family)
    finite = preset.replace(name="from-20", sigmas=[20.0] + preset.sigmas[1:].tolist())
    assert presets.kind(finite) == ("flow" if family == "sd3" else None)
    with pytest.raises(ValueError, match=r"starts at σ = 20 \(t = 0.9524\); SD3/FLUX pipelines "
                                         r"start from pure noise at t = 1"):
        PresetScheduler.from_preset(finite, pipe.scheduler.config)
    with pytest.raises(ValueError, match="starts at σ = 20"):
        flow_euler_sigmas(finite)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_list_ending_above_zero_hands_back_y(pipes, kind):
    """Stopping at σ_N > 0 leaves y = x0 + σ_N·ε to the decoder, as generate does."""
    pipe = pipes[kind]
    original = pipe.scheduler
    preset = flow_preset(pipe, "dpmpp_2m", end="sigma")
    assert float(preset.sigmas[-1]) > 0
    try:
        pipe.scheduler = PresetScheduler.from_preset(preset, original.config)
        got = run_pipeline(pipe, preset, num_inference_steps=preset.nfe)
    finally:
        pipe.scheduler = original
    assert rel(got, ours(pipe, preset)) < 1e-5


def test_timesteps_are_the_backends_and_the_config_round_trips(pipes, tmp_path):
    pipe = pipes["sd3"]
    preset = flow_preset(pipe, "dpmpp_2m")
    sched = PresetScheduler.from_preset(preset, pipe.scheduler.config)
    assert float(sched.timesteps[0]) == 1000.0 and sched.init_noise_sigma == 1.0
    t = [float(v) for v in comfy.flow_t_string(preset.sigmas[:-1]).split(", ")]
    assert sched.timesteps.tolist() == pytest.approx([1000 * v for v in t], rel=1e-6)
    sched.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "flow" and config["use_flow_sigmas"] is False
    assert config["shift"] == 3.0   # the pipeline's own settings ride along (a swap back)
    again = PresetScheduler.from_pretrained(tmp_path)
    assert again.flow and torch.equal(again.timesteps, sched.timesteps)
    assert math.isinf(float(again.preset.sigmas[0]))


def test_kinds_are_refused_across(pipes):
    sd = tiny_sd_pipeline()
    flow = flow_preset(pipes["sd3"], "euler", family="sd3")
    with pytest.raises(ValueError, match="made for a flow-matching model; this pipeline's "
                                         "scheduler is a DDPM one"):
        PresetScheduler.from_preset(flow, sd.scheduler.config)
    with pytest.raises(ValueError, match="made for a DDPM-trained model; this pipeline's "
                                         "scheduler is a flow-matching one"):
        PresetScheduler.from_preset(presets.load("sd15-5"), pipes["sd3"].scheduler.config)
    with pytest.raises(ValueError, match="sd15-5 \\(sd15\\) was made for a DDPM-trained model"):
        schedsearch.generate(pipes["sd3"], "sd15-5", PROMPTS[:1], [0], **SIZE)
    sched = PresetScheduler.from_preset(flow, pipes["sd3"].scheduler.config)
    with pytest.raises(ValueError, match="img2img and inpainting .* not supported on flow"):
        sched.scale_noise(torch.zeros(1, 16, 8, 8), torch.tensor([500.0]), torch.zeros(1, 16, 8, 8))


def test_comfy_t_list_and_the_workflow_refusal(tmp_path, capsys, monkeypatch):
    from schedsearch.cli import main
    from schedsearch.noise import FLOW

    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)
    sigmas = schedules.build({"name": "knots", "fractions": [0.5, 0.3, 0.2]}, FLOW)
    preset = Preset(name="gmm-flow-4", family="gmm-flow", sigmas=sigmas, solver="euler",
                    guidance=3.0)
    path = preset.save(tmp_path / "gmm-flow-4.json")
    assert main(["presets", "show", str(path), "--format", "comfy"]) == 0
    text = capsys.readouterr().out.strip()
    values = [float(v) for v in text.split(", ")]
    assert values[0] == 1.0 and values[-1] == 0.0 and len(values) == 5
    for t, s in zip(values, sigmas.tolist()):   # t = σ/(1+σ), ∞ → 1
        assert t == pytest.approx(1.0 if math.isinf(s) else s / (1 + s), abs=1e-8)
    assert comfy.parse_manual_sigmas(text) == [pytest.approx(v, rel=1e-6) for v in values]
    assert main(["presets", "show", str(path)]) == 0
    assert "t: 1.00000000" in capsys.readouterr().out
    assert main(["presets", "show", str(path), "--format", "comfy-workflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not built" in err and "EmptySD3LatentImage" in err
    # the OptimalSteps list starts below ∞: its t list starts at 0.9968
    optimal = preset.replace(sigmas=schedules.build({"name": "optimalsteps", "steps": 4}, FLOW))
    assert comfy.manual_sigmas(optimal).startswith("0.99680000")
    # SD presets are unchanged
    assert comfy.manual_sigmas(presets.load("sd15-5")) == comfy.sigma_string(
        presets.load("sd15-5").sigmas)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_schedule_command_reads_a_flowmatch_config_as_diffusers_does(pipes, tmp_path, capsys,
                                                                     kind):
    """`schedsearch schedule flow --noise-config` on the pipeline's own scheduler config prints
    the σ list (and ComfyUI t list) of diffusers' FlowMatchEulerDiscreteScheduler at 1024²."""
    import numpy as np

    from schedsearch.cli import main

    config = dict(pipes[kind].scheduler.config)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    assert main(["schedule", "flow", "--steps", "6", "--noise-config", str(path),
                 "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)["sigmas"]
    theirs = type(pipes[kind].scheduler).from_config(config)
    if config.get("use_dynamic_shifting"):   # FluxPipeline: its own grid, μ at 4096 tokens
        theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=1.15)
    else:
        theirs.set_timesteps(6)
    t = theirs.sigmas.double()   # diffusers' "sigmas" of a flow model are its times t
    assert math.isinf(got[0]) and got[-1] == 0 and len(got) == len(t)
    assert got[1:-1] == pytest.approx((t[1:-1] / (1 - t[1:-1])).tolist(), rel=1e-6)
    assert main(["schedule", "flow", "--steps", "6", "--noise-config", str(path),
                 "--format", "comfy"]) == 0
    comfy_t = [float(v) for v in capsys.readouterr().out.split(", ")]
    assert comfy_t == pytest.approx(t.tolist(), abs=1e-6)
    assert main(["schedule", "ays", "--steps", "6", "--noise-config", str(path)]) == 2
    assert "no faithful flow-model analogue" in capsys.readouterr().err
    # without a config the command has no flow model to build for (it has no --model): say how
    for name in ("flow", "optimalsteps"):
        assert main(["schedule", name, "--steps", "6"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"schedsearch schedule: error: schedule {name!r} is for flow-matching models: give "
            f"one's scheduler config with --noise-config FILE (e.g. sd3/scheduler/"
            f"scheduler_config.json of a diffusers folder; docs/flow.md)")
