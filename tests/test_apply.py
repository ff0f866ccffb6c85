"""Presets applied from Python to a diffusers pipeline object, through our sampler."""

import pytest
import torch

import schedsearch
from schedsearch import presets
from schedsearch.models.diffusers_sd import from_pipeline, load_stable_diffusion
from schedsearch.sampler import sample
from tiny import save_pipeline, tiny_sd_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_sd_pipeline(seed=3)
    folder = save_pipeline(pipe, tmp_path_factory.mktemp("sd"))
    return pipe, folder


def test_generate_on_a_pipeline_object_equals_the_loaded_model(saved):
    pipe, folder = saved
    preset = presets.load("sd15-5")  # DPM++1S, 5 NFE, original-variant FreeU on every step
    images = schedsearch.generate(pipe, preset, ["a red cube", "a blue ball"], seeds=[4, 9])
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert len(images) == 2 and images[0].size == (side, side)
    model = load_stable_diffusion(folder, device=torch.device("cpu"), dtype=torch.float32)
    ref = sample(model, preset.sigmas, ["a red cube", "a blue ball"], [4, 9], solver=preset.solver,
                 guidance=preset.guidance, freeu=preset.freeu)
    again = schedsearch.generate(pipe, preset, ["a red cube", "a blue ball"], seeds=[4, 9],
                                 output="samples")
    assert torch.equal(again.latents, ref.latents) and again.nfe == 5
    # the preset's FreeU plan was applied: without it the result differs
    plain = sample(model, preset.sigmas, ["a red cube"], [4], solver=preset.solver,
                   guidance=preset.guidance)
    assert not torch.equal(plain.latents, ref.latents[:1])


def test_generate_takes_names_specs_and_refuses_other_objects(saved):
    pipe, _ = saved
    with pytest.warns(UserWarning, match="ays-sd15-5 was made for sd15 models; applying it to a gmm"):
        out = schedsearch.generate("gmm", "ays-sd15-5", [0, 1, 2], output="samples")
    assert out.latents.shape == (3, 16) and out.nfe == 5
    with pytest.raises(TypeError, match="expected a model spec, a diffusers pipeline"):
        schedsearch.generate(object(), "sd15-5", ["x"])
    with pytest.raises(ValueError, match="not supported"):
        from_pipeline(type("FluxPipeline", (), {})())
    with pytest.warns(UserWarning, match="made for sdxl models"):
        schedsearch.generate(pipe, "sdxl-8", ["x"], seeds=[0], output="samples")


def test_generate_takes_one_prompt_as_a_string_and_checks_output_before_sampling(saved):
    """A string was a list of one-letter prompts: "a red cube" gave 10 images."""
    pipe, _ = saved
    one = schedsearch.generate(pipe, "sd15-5", "a red cube", seeds=[4], output="samples")
    listed = schedsearch.generate(pipe, "sd15-5", ["a red cube"], seeds=[4], output="samples")
    assert one.prompts == ["a red cube"] and torch.equal(one.latents, listed.latents)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="output must be 'pil' or 'samples', got 'png'"):
            schedsearch.generate(pipe, "sd15-5", "a red cube", output="png")
    finally:
        hook.remove()
    assert calls == []   # refused before any model call
    model = schedsearch.as_model(pipe)
    with pytest.raises(TypeError, match=r"prompts must be a list, one per image; got the string "
                                        r"'a red cube' \(write \['a red cube'\]\)"):
        sample(model, presets.load("sd15-5").sigmas, "a red cube", [0] * 10)


def test_generate_takes_one_seed_as_an_int_and_refuses_a_string_of_them(saved):
    """seeds=4 was a TypeError, seeds="12" two seeds 1 and 2, prompts=None a TypeError."""
    pipe, _ = saved
    one = schedsearch.generate(pipe, "sd15-5", "a red cube", seeds=4, output="samples")
    listed = schedsearch.generate(pipe, "sd15-5", ["a red cube"], seeds=[4], output="samples")
    assert one.seeds == [4] and torch.equal(one.latents, listed.latents)
    with pytest.raises(ValueError, match="seeds must be an integer or a list of integers, got '4'"):
        schedsearch.generate(pipe, "sd15-5", "a red cube", seeds="4")
    with pytest.raises(ValueError, match=r"prompts must be a prompt or a list of prompts, got None"):
        schedsearch.generate(pipe, "sd15-5", None, seeds=[4])
    # a testbed's class label is one prompt too
    with pytest.warns(UserWarning, match="preset sd15-5 was made for sd15 models; applying it "
                                         "to a digits model"):
        digits = schedsearch.generate("digits", "sd15-5", 7, seeds=4, output="samples")
    assert digits.prompts == [7] and digits.seeds == [4]


def test_a_preset_is_a_preset_a_name_a_path_or_its_json(saved, tmp_path):
    """A pathlib.Path was taken for a Preset and failed deep inside ('has no attribute family')."""
    from pathlib import Path

    from schedsearch.diffusers import PresetScheduler

    pipe, _ = saved
    preset = presets.load("sd15-5")
    path = preset.replace(name="mine").save(tmp_path / "mine.json")
    for given in (Path(path), str(path), preset.to_json(), "sd15-5", preset):
        got = presets.as_preset(given)
        assert torch.equal(got.sigmas, preset.sigmas) and got.freeu == preset.freeu
    by_path = schedsearch.generate(pipe, Path(path), ["x"], seeds=[1], output="samples")
    by_name = schedsearch.generate(pipe, "sd15-5", ["x"], seeds=[1], output="samples")
    assert torch.equal(by_path.latents, by_name.latents)
    scheduler = PresetScheduler.from_preset(Path(path), pipe.scheduler.config)
    assert scheduler.preset.name == "mine"
    with pytest.raises(TypeError, match="expected a preset: a Preset, a preset name, a path to "
                                        "its .json file or its JSON object, got int"):
        schedsearch.generate(pipe, 5, ["x"])
