"""Presets applied from Python to a diffusers pipeline object, through our sampler."""

import re

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


@pytest.mark.parametrize("seeds, message", [
    ([0.5, 1.9], "seeds must be integers, got 0.5"),            # ran as seeds 0 and 1
    ([True, 2], "seeds must be integers, got True"),
])
def test_seeds_that_are_not_integers_are_refused(seeds, message):
    with pytest.raises(ValueError, match=message):
        schedsearch.generate("digits", "sd15-5", [1, 2], seeds)


def test_numpy_and_tensor_seeds_labels_and_guidance_are_taken():
    """0-d tensors and arrays were 'iteration over a 0-d tensor'; np.float32 guidance was 'not a
    number'; a float array of seeds was truncated."""
    import numpy as np

    want = schedsearch.generate("digits", "sd15-5", [3], [4], output="samples").images
    for prompts, seeds in ((torch.tensor(3), np.array(4)), (np.array([3]), torch.tensor([4])),
                           ([np.int64(3)], [np.int32(4)])):
        got = schedsearch.generate("digits", "sd15-5", prompts, seeds, output="samples")
        assert torch.equal(got.images, want)
    g = schedsearch.generate("digits", "sd15-5", [3], [4], guidance=np.float32(5.5),
                             output="samples")
    assert torch.equal(g.images, want)   # sd15-5's own guidance is 5.5
    with pytest.raises(ValueError, match=r"seeds must be integers, got np.float64\(0.0\)"):
        schedsearch.generate("digits", "sd15-5", [1, 2], np.array([0.0, 1.7]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=1.5), "batch_size must be an integer >= 1, got 1.5"),
    (dict(batch_size=True), "batch_size must be an integer >= 1, got True"),
    (dict(height=64), "height set the image size of a pipeline or a model spec to load; digits "
                      "has its own"),
])
def test_bad_keyword_values_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedsearch.generate("digits", "sd15-5", [1], [3], **kwargs)


def test_to_pil_says_what_it_takes_and_a_flow_presets_comfy_text_is_its_t_list():
    import math

    with pytest.raises(TypeError, match="to_pil takes the Samples of generate"):
        schedsearch.to_pil(schedsearch.generate("digits", "sd15-5", [1], [3]))
    flow = presets.Preset("f", "gmm-flow", [math.inf, 2.0, 0.5, 0.0], "euler")
    assert flow.comfy() == "1.00000000, 0.66666667, 0.33333333, 0.00000000"
