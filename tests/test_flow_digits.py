"""The ``digits-flow`` testbed: the digits UNet trained by flow matching, with shipped weights.

Checks the model contract from σ = ∞, batch invariance, CFG, that its samples are recognised as the
requested digits, the shared FID feature space and reference data, and missing weights."""

import math

import pytest
import torch

from schedsearch import schedules as S
from schedsearch.metrics import features
from schedsearch.metrics.refstats import default_refstats
from schedsearch.models import DEFAULT_GUIDANCE, FLOW_FAMILIES, default_prompts, is_flow, load
from schedsearch.models.digits import WeightsError, load_classifier
from schedsearch.models.digits_flow import DigitsFlowModel, load_digits_flow
from schedsearch.noise import FLOW
from schedsearch.sampler import initial_noise, sample

INF = math.inf


@pytest.fixture(scope="module")
def model():
    return load("digits-flow", device="cpu")


def test_the_model_contract(model):
    assert isinstance(model, DigitsFlowModel) and model.family == "digits-flow"
    assert model.table is FLOW and model.latent_shape == (1, 8, 8) and model.unet is not None
    assert model.fingerprint().startswith("digits-flow-")
    assert model.fingerprint() != load("digits", device="cpu").fingerprint()
    assert is_flow("digits-flow") and set(FLOW_FAMILIES) == {"sd3", "flux", "digits-flow",
                                                            "gmm-flow"}
    assert DEFAULT_GUIDANCE["digits-flow"] == 4.0 and default_prompts(model) == "classes:10"


def test_the_first_call_is_at_timestep_1000_on_the_noise(model):
    seen = []
    handle = model.unet.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        sample(model, [INF, 0.0], [3], [7], solver="euler", guidance=2.0)
    finally:
        handle.remove()
    x_in, steps = seen[0]
    assert bool((steps == 1000.0).all())
    eps = initial_noise(model.latent_shape, [7], INF)
    assert torch.equal(x_in[0], eps[0]) and torch.equal(x_in[16], eps[0])   # [uncond; cond]


def test_guidance_is_applied_to_the_denoised_values(model):
    cond = model.condition([1, 4, ""])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (INF, 2.0):
        d_c = model.denoise(x, sigma, cond, 1.0)
        d_u = model.denoise(x, sigma, model.condition(["", "", ""]), 1.0)
        torch.testing.assert_close(model.denoise(x, sigma, cond, 3.0), d_u + 3.0 * (d_c - d_u),
                                   rtol=1e-5, atol=1e-5)


def test_an_image_does_not_depend_on_its_batch(model):
    sig = S.build({"name": "flow", "steps": 4}, model.table)
    labels, seeds = [i % 10 for i in range(17)], list(range(100, 117))
    batch = sample(model, sig, labels, seeds, solver="dpmpp_2m", guidance=2.0).latents
    for i in (0, 9, 16):
        alone = sample(model, sig, [labels[i]], [seeds[i]], solver="dpmpp_2m", guidance=2.0)
        assert torch.equal(alone.latents[0], batch[i])


def test_samples_are_the_requested_digits(model):
    classifier = load_classifier()
    labels = [i % 10 for i in range(100)]
    out = sample(model, S.build({"name": "flow", "steps": 12}, model.table), labels,
                 range(100), solver="dpmpp_2m", guidance=2.0)
    hits = (classifier.predict(out.images) == torch.tensor(labels)).float().mean()
    assert float(hits) >= 0.9


def test_it_shares_the_digits_feature_space_and_reference(model, tmp_path):
    ext = features.build(model=model)
    assert ext.name == load_classifier().fingerprint()
    mine = default_refstats(model, ext, cache=str(tmp_path))
    theirs = default_refstats(load("digits", device="cpu"), ext, cache=str(tmp_path))
    assert mine.n == theirs.n == 359
    assert (mine.mu == theirs.mu).all() and (mine.sigma == theirs.sigma).all()
    assert mine.meta["model_fingerprint"] == model.fingerprint()


def test_missing_weights_say_how_to_regenerate_them(tmp_path):
    with pytest.raises(WeightsError, match="digits_flow_train --out"):
        load_digits_flow(weights_dir=tmp_path)


def test_sample_and_score_commands(tmp_path, capsys, monkeypatch):
    """With presets validating through schedules.flow_explicit (see docs/flow.md, "What is left
    to wire"), the commands run the testbed from σ = ∞ with their defaults."""
    import json

    from schedsearch.cli import main

    monkeypatch.setattr(S, "explicit", S.flow_explicit)
    out = str(tmp_path / "digits-flow")
    assert main(["sample", "--model", "digits-flow", "--prompt", "3", "--seeds", "0-1",
                 "--steps", "6", "--no-progress", "--out", out]) == 0
    with open(f"{out}/samples.json", encoding="utf-8") as f:
        assert json.load(f)["schedule"]["sigmas"][0] == INF
    capsys.readouterr()
    assert main(["score", "--model", "digits-flow", "--n", "64", "--checkpoints", ""]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 8 and result["provenance"]["model"] == "digits-flow"
