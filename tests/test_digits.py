"""The built-in digits testbed: shipped weights, the Model protocol, batch invariance, classifier
accuracy, recognisable samples, FreeU, the data split and the errors for missing weights."""

import json
import shutil

import numpy as np
import pytest
import torch

from schedsearch import schedules
from schedsearch.freeu import DEFAULTS, set_freeu
from schedsearch.models import load
from schedsearch.models import digits as D
from schedsearch.models.unet import Conditioning
from schedsearch.noise import SD
from schedsearch.sampler import FirstCalls, sample
from schedsearch.solvers import SOLVERS


@pytest.fixture(scope="module")
def model():
    return D.load_digits(device="cpu")


@pytest.fixture(scope="module")
def classifier():
    return D.load_classifier(device="cpu")


# -- weights and protocol ---------------------------------------------------------------------------
def test_shipped_weights_load_through_the_model_registry(model):
    m = load("digits", device="cpu")
    assert m.fingerprint() == model.fingerprint()
    assert model.fingerprint().startswith("digits-") and len(model.fingerprint()) > 12
    config = D.read_config()
    assert config["unet"]["weights"] == "EMA"
    assert config["unet"]["training"]["wall_seconds"] > 0


def test_weight_files_are_small():
    total = sum(p.stat().st_size for p in D.WEIGHTS_DIR.iterdir() if p.is_file())
    assert total < 10 * 2**20


def test_model_follows_the_protocol(model):
    from diffusers import UNet2DConditionModel

    assert (model.name, model.family) == ("digits", "digits")
    assert model.table is SD and model.latent_shape == (1, 8, 8)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert isinstance(model.unet, UNet2DConditionModel)
    assert len(set(model.unet.config.block_out_channels)) >= 2  # FreeU's two stages
    cond = model.condition([3, "3", " 7 ", "", None])
    assert isinstance(cond, Conditioning) and len(cond) == 5
    c = model.unet.config.cross_attention_dim
    assert cond.cond.shape == cond.uncond.shape == (5, 1, c)
    assert torch.equal(cond.cond[0], cond.cond[1])
    assert not torch.equal(cond.cond[0], cond.cond[2])
    assert torch.equal(cond.cond[3], cond.uncond[0]) and torch.equal(cond.cond[4], cond.uncond[0])
    x = torch.randn(5, 1, 8, 8) * 3
    d = model.denoise(x, 3.0, cond, 2.0)
    assert d.shape == x.shape and d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    img = model.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).view(5, 1, 1, 1))
    assert img.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("bad", [10, -1, "12", "a", "3.0", 3.5, True, [3]])
def test_condition_rejects_anything_but_a_class_label(model, bad):
    with pytest.raises(ValueError, match="class labels 0..9"):
        model.condition([bad])


def test_per_image_sigma_matches_scalar_sigma(model):
    cond = model.condition([1, 2, 3])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    scalar = model.denoise(x, 2.0, cond, 3.0)
    per_image = model.denoise(x, torch.full((3,), 2.0), cond, 3.0)
    torch.testing.assert_close(scalar, per_image, rtol=0, atol=0)


# -- batch invariance -------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_an_image_sampled_alone_equals_the_same_image_in_a_batch_of_8(model, guidance):
    sigmas = schedules.karras(10)
    alone = sample(model, sigmas, [3], [7], guidance=guidance)
    prompts, seeds = [0, 1, 2, 4, 5, 3, "", 9], [11, 12, 13, 14, 15, 7, 16, 17]
    batch = sample(model, sigmas, prompts, seeds, guidance=guidance, batch_size=8)
    assert torch.equal(alone.latents[0], batch.latents[5])


@pytest.mark.parametrize("size", [17, 256])
def test_batch_invariance_holds_across_the_padding_threshold(model, size):
    """Batches under 16 images are padded (see ``MIN_BATCH``); larger ones must land in the same
    kernel regime, bitwise."""
    sigmas = schedules.karras(3)
    alone = sample(model, sigmas, [6], [5], guidance=3.0)
    prompts = [i % 10 for i in range(size)]
    seeds = list(range(100, 100 + size))
    prompts[size // 2], seeds[size // 2] = 6, 5
    batch = sample(model, sigmas, prompts, seeds, guidance=3.0, batch_size=size)
    assert torch.equal(alone.latents[0], batch.latents[size // 2])


# -- the first-call cache -------------------------------------------------------------------------
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_cached_first_call_gives_the_images_an_uncached_run_gives(model, solver):
    """Two lists from the same σ_0 on the same images: the second one's first call comes from the
    cache (one hit per batch), and every solver ends bit for bit where it ends without a cache."""
    first = schedules.karras(4)
    other = schedules.explicit([float(first[0]), 3.0, 0.9, 0.2, 0.0])
    prompts, seeds = [1, 4, 7, 2, 9], [21, 22, 23, 24, 25]
    cache = FirstCalls()
    sample(model, first, prompts, seeds, solver=solver, guidance=3.0, batch_size=3,
           first_calls=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    cached = sample(model, other, prompts, seeds, solver=solver, guidance=3.0, batch_size=3,
                    first_calls=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    plain = sample(model, other, prompts, seeds, solver=solver, guidance=3.0, batch_size=3)
    assert torch.equal(cached.latents, plain.latents)
    assert cached.nfe == plain.nfe       # a served call still counts: NFE is the schedule's cost


def test_the_first_call_cache_keeps_apart_what_changes_the_first_call(model):
    """Another σ_0, guidance, FreeU setting at step 0 or batch of images is a miss, and each gives
    what it gives without the cache; FreeU switched on only after step 0 shares the entry."""
    from schedsearch.freeu import FreeUPlan

    sig = schedules.karras(3)
    prompts, seeds = [3, 5], [1, 2]
    cache = FirstCalls()
    sample(model, sig, prompts, seeds, guidance=3.0, first_calls=cache)
    on = DEFAULTS["sd15"]
    cases = [
        dict(sigmas=schedules.karras(3, sigma_max=10.0)),
        dict(guidance=2.0),
        dict(freeu=FreeUPlan([on, None, None])),
        dict(seeds=[1, 3]),
        dict(prompts=[3, 6]),
    ]
    for i, case in enumerate(cases, start=1):
        args = {"sigmas": sig, "prompts": prompts, "seeds": seeds, "guidance": 3.0, **case}
        got = sample(model, args.pop("sigmas"), args.pop("prompts"), args.pop("seeds"),
                     first_calls=cache, **args)
        assert (cache.hits, cache.misses) == (0, 1 + i), case
        fresh = sample(model, case.get("sigmas", sig), case.get("prompts", prompts),
                       case.get("seeds", seeds), guidance=case.get("guidance", 3.0),
                       freeu=case.get("freeu"))
        assert torch.equal(got.latents, fresh.latents), case
    late = sample(model, sig, prompts, seeds, guidance=3.0, freeu=FreeUPlan([None, on, None]),
                  first_calls=cache)
    assert cache.hits == 1
    assert torch.equal(late.latents, sample(model, sig, prompts, seeds, guidance=3.0,
                                            freeu=FreeUPlan([None, on, None])).latents)


def test_the_first_call_cache_drops_the_least_recently_used_beyond_its_size(model):
    sig = schedules.karras(3)
    one = D.MIN_BATCH * 1 * 8 * 8 * 4             # a 2-image batch runs padded to MIN_BATCH rows
    cache = FirstCalls(max_bytes=2 * one)
    for seeds in ([1, 2], [3, 4], [1, 2], [5, 6]):  # the third call refreshes [1, 2]
        sample(model, sig, [0, 0], seeds, guidance=3.0, first_calls=cache)
    assert (cache.hits, cache.misses) == (1, 3)
    sample(model, sig, [0, 0], [1, 2], guidance=3.0, first_calls=cache)   # kept: used recently
    sample(model, sig, [0, 0], [3, 4], guidance=3.0, first_calls=cache)   # dropped
    assert (cache.hits, cache.misses) == (2, 4)


# -- classifier and samples -------------------------------------------------------------------------
def test_classifier_recognises_heldout_digits(classifier):
    images, labels = D.digits_data("heldout")
    accuracy = (classifier.predict(D.to_unit(images)) == labels).float().mean().item()
    assert accuracy >= 0.97, accuracy
    feats = classifier.features(D.to_unit(images[:5]))
    assert feats.shape == (5, classifier.dim) and 64 <= classifier.dim <= 128


def test_classifier_rejects_wrong_shapes(classifier):
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        classifier.predict(torch.zeros(2, 8, 8))


def test_20_step_samples_are_recognised(model, classifier):
    prompts = [c for c in (0, 1, 3, 4, 7, 8) for _ in range(5)]
    out = sample(model, schedules.karras(20), prompts, list(range(len(prompts))), guidance=3.0,
                 batch_size=len(prompts))
    rate = (classifier.predict(out.images) == torch.tensor(prompts)).float().mean().item()
    assert rate >= 0.9, rate


# -- FreeU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["diffusers", "original"])
def test_freeu_changes_the_output_and_clears_cleanly(model, variant):
    cond = model.condition([2, 5])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 4
    plain = model.denoise(x, 4.0, cond, 3.0)
    set_freeu(model.unet, DEFAULTS["sd15"], variant)
    try:
        boosted = model.denoise(x, 4.0, cond, 3.0)
    finally:
        set_freeu(model.unet, None)
    assert (boosted - plain).abs().max() > 1e-3
    torch.testing.assert_close(model.denoise(x, 4.0, cond, 3.0), plain, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["diffusers", "original"])
def test_batch_invariance_holds_with_freeu_on(model, variant):
    from schedsearch.freeu import FreeUPlan

    plan = FreeUPlan.from_start(6, 0, DEFAULTS["sd15"], variant)
    sigmas = schedules.karras(6)
    alone = sample(model, sigmas, [4], [9], guidance=2.0, freeu=plan)
    batch = sample(model, sigmas, [0, 1, 2, 4, 5, 6, 7, 8], [1, 2, 3, 9, 5, 6, 7, 8],
                   guidance=2.0, freeu=plan, batch_size=8)
    assert torch.equal(alone.latents[0], batch.latents[3])


# -- data -------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_stratified_and_the_one_trained_on():
    train, heldout = D.split_indices()
    D.split_indices.cache_clear()
    again = D.split_indices()
    assert np.array_equal(train, again[0]) and np.array_equal(heldout, again[1])
    assert not set(train.tolist()) & set(heldout.tolist())
    assert len(train) + len(heldout) == 1797
    _, labels = D._all_digits()
    for c in range(10):
        share = (labels[heldout] == c).sum() / (labels == c).sum()
        assert abs(share - D.HELDOUT_FRACTION) < 0.01
    assert D.read_config()["split"]["fingerprint"] == D.split_fingerprint()


def test_digits_data_range_shape_and_types():
    x, y = D.digits_data("train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(torch.unique(x * 8 + 8).tolist()) <= set(range(17))
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        D.digits_data("test")


# -- errors -----------------------------------------------------------------------------------------
def test_missing_weights_say_how_to_regenerate_them(tmp_path):
    with pytest.raises(D.WeightsError, match="python -m schedsearch.models.digits_train"):
        D.load_digits(weights_dir=tmp_path)
    with pytest.raises(D.WeightsError, match="--what classifier"):
        shutil.copy(D.WEIGHTS_DIR / D.CONFIG_FILE, tmp_path / D.CONFIG_FILE)
        D.load_classifier(weights_dir=tmp_path)


def test_corrupt_weights_are_refused(tmp_path):
    shutil.copy(D.WEIGHTS_DIR / D.CONFIG_FILE, tmp_path / D.CONFIG_FILE)
    data = bytearray((D.WEIGHTS_DIR / D.UNET_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / D.UNET_FILE).write_bytes(bytes(data))
    with pytest.raises(D.WeightsError, match="sha256.*digits_train --what unet"):
        D.load_digits(weights_dir=tmp_path)
    config = json.loads((tmp_path / D.CONFIG_FILE).read_text())
    del config["unet"]["sha256"]  # without the hash, a truncated file is still caught on reading
    (tmp_path / D.CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / D.UNET_FILE).write_bytes(bytes(data[:1000]))
    with pytest.raises(D.WeightsError, match="cannot read"):
        D.load_digits(weights_dir=tmp_path)
