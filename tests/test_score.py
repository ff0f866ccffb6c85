"""The scorer: determinism, nesting, early stopping, non-finite candidates, the `score` and
`refstats` commands, and whether the FID proxy ranks schedules the right way."""

import json

import numpy as np
import pytest
import torch

from schedsearch import prompts, schedules
from schedsearch.cli import main
from schedsearch.metrics.features import CleanFID, Identity
from schedsearch.metrics.fid import frechet_distance, kid, statistics
from schedsearch.metrics.refstats import ExtractorMismatch, RefStats
from schedsearch.metrics.score import STAGES, Scorer, ScoreError
from schedsearch.models import load



@pytest.fixture(scope="module")
def gmm():
    return load("gmm", device="cpu")


@pytest.fixture(scope="module")
def ref(gmm):
    data = gmm.sample_data([i % gmm.num_classes for i in range(4000)], seed=1).float()
    return RefStats.from_features(Identity()(data), extractor=Identity(), source="test")


def _scorer(model, ref, n, **kw):
    kw.setdefault("guidance", 1.0)
    kw.setdefault("batch_size", 32)
    return Scorer(model, Identity(), ref, prompts.load("classes:4", n, seed=kw.pop("seed", 0)),
                  **kw)


class Wrapped:
    """A real model object around the gmm testbed that counts the images it denoises and can be
    made to return NaN below a noise level or from its decoder."""

    def __init__(self, model, nan_below=None, nan_decode=False):
        self.model, self.nan_below, self.nan_decode = model, nan_below, nan_decode
        self.images_denoised = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def denoise(self, x, sigma, cond, guidance):
        d = self.model.denoise(x, sigma, cond, guidance)
        if float(sigma) >= self.model.table.sigma_max - 1e-6:
            self.images_denoised += x.shape[0]   # first step: one per image
        if self.nan_below is not None and float(sigma) < self.nan_below:
            return torch.full_like(d, float("nan"))
        return d

    def decode(self, latents):
        out = self.model.decode(latents)
        return out * float("nan") if self.nan_decode else out


def test_scoring_twice_gives_the_same_numbers(gmm, ref):
    s = _scorer(gmm, ref, 96, checkpoints=(32,))
    a, b = s.score(schedules.karras(6)), s.score(schedules.karras(6))
    assert a.fid == b.fid and a.kid == b.kid and a.fid_at == b.fid_at
    assert np.array_equal(a.features, b.features)
    assert a.nfe == 6 and a.n == 96 and list(a.fid_at) == [32, 96]


def test_lists_from_one_sigma_max_share_their_first_model_call(gmm, ref):
    """A second list from the same σ_0 skips its first model call on every batch and scores
    exactly what a scorer without the cache scores; another σ_0 is sampled afresh."""
    model = Wrapped(gmm)
    shared = _scorer(model, ref, 96, checkpoints=(32,))
    plain = _scorer(gmm, ref, 96, checkpoints=(32,), share_first_calls=False)
    lists = [schedules.karras(6), schedules.explicit([float(schedules.karras(6)[0]), 2.0, 0.3, 0.0]),
             schedules.karras(6, sigma_max=10.0)]
    seen = []
    for sig in lists:
        a, b = shared.score(sig, solver="dpmpp_2m"), plain.score(sig, solver="dpmpp_2m")
        assert a.fid == b.fid and np.array_equal(a.features, b.features) and a.nfe == b.nfe
        seen.append(model.images_denoised)
    assert seen == [96, 96, 96]          # the 3-step list's first call came from the cache
    assert (shared.first_calls.hits, shared.first_calls.misses) == (3, 6)   # 3 batches a list
    assert plain.first_calls is None


def test_subsets_nest_whatever_the_batch_size(gmm, ref):
    small = _scorer(gmm, ref, 64, batch_size=24, checkpoints=(64,)).score(schedules.karras(5))
    large = _scorer(gmm, ref, 128, batch_size=24, checkpoints=(64,)).score(schedules.karras(5))
    assert np.array_equal(large.features[:64], small.features)
    assert large.fid_at[64] == small.fid
    assert large.fid != small.fid


def test_fid_and_kid_are_clean_fids_metrics_of_the_generated_features(gmm, ref):
    s = _scorer(gmm, ref, 80, checkpoints=(40,))
    res = s.score(schedules.karras(4), keep_images=10)
    mu, sigma = statistics(res.features)
    assert res.fid == frechet_distance(mu, sigma, ref.mu, ref.sigma)
    mu40, sigma40 = statistics(res.features[:40])
    assert res.fid_at[40] == frechet_distance(mu40, sigma40, ref.mu, ref.sigma)
    # clean-fid's kernel_distance, up to summation order (the scorer reuses the reference half)
    assert res.kid == pytest.approx(kid(ref.features, res.features, seed=0), rel=1e-10)
    # the gmm's images are its vectors, and the identity extractor keeps them
    assert torch.equal(res.images, torch.from_numpy(res.features[:10]).float())
    d = res.as_dict()
    assert json.loads(json.dumps(d))["fid_at"] == {"40": res.fid_at[40], "80": res.fid}


def test_time_is_broken_down_by_stage(gmm, ref):
    res = _scorer(gmm, ref, 64, checkpoints=()).score(schedules.karras(3))
    sec = res.seconds
    assert set(STAGES) == set(sec)
    assert 0 < sec["model"] <= sec["sampling"] <= sec["total"]
    assert sec["sampling"] + sec["features"] + sec["statistics"] <= sec["total"] + 1e-6


def test_a_checkpoint_callback_can_stop_a_candidate_early(gmm, ref):
    model = Wrapped(gmm)
    seen = []

    class Pruned(Exception):
        pass

    def on_checkpoint(n, fid):
        seen.append((n, fid))
        if n >= 48:
            raise Pruned

    s = _scorer(model, ref, 160, batch_size=32, checkpoints=(16, 48))
    with pytest.raises(Pruned):
        s.score(schedules.karras(4), on_checkpoint=on_checkpoint)
    assert [n for n, _ in seen] == [16, 48]
    assert model.images_denoised == 48          # nothing past the checkpoint was sampled
    full = _scorer(gmm, ref, 160, batch_size=32, checkpoints=(16, 48)).score(schedules.karras(4))
    assert seen == [(16, full.fid_at[16]), (48, full.fid_at[48])]


def test_non_finite_samples_raise_score_error_with_the_reason(gmm, ref):
    with pytest.raises(ScoreError, match=r"non-finite values at step \d+ \(sigma = 0\.") as exc:
        _scorer(Wrapped(gmm, nan_below=1.0), ref, 32).score(schedules.karras(6))
    assert isinstance(exc.value, ValueError)
    with pytest.raises(ScoreError, match="decoded images 0..31 are not finite"):
        _scorer(Wrapped(gmm, nan_decode=True), ref, 32).score(schedules.karras(3))


def test_statistics_from_another_extractor_are_refused(gmm):
    net = torch.nn.Identity()
    other = RefStats.from_features(np.random.default_rng(0).normal(size=(20, 16)),
                                   extractor=CleanFID(net, "some-net"), source="x")
    with pytest.raises(ExtractorMismatch, match="'some-net' extractor, but scoring uses"):
        _scorer(gmm, other, 32)


def test_the_proxy_ranks_schedules_on_the_exact_testbed(gmm, ref):
    """With guidance 1 an exact solver reproduces the data distribution, so a fine schedule must
    score like exact data samples (within the spread over seed sets), and a coarse one far worse."""
    n = 128
    floor = []
    for seed in range(8):
        data = gmm.sample_data([i % 4 for i in range(n)], seed=100 + seed).float()
        floor.append(statistics(Identity()(data)))
    floor = np.array([frechet_distance(mu, s, ref.mu, ref.sigma) for mu, s in floor])
    noise = floor.std(ddof=1)
    s = _scorer(gmm, ref, n, batch_size=128, checkpoints=())
    fid = {steps: s.score(schedules.karras(steps)).fid for steps in (2, 8, 30)}
    assert fid[2] > fid[8] > fid[30]
    assert fid[2] > floor.mean() + 10 * noise
    assert abs(fid[30] - floor.mean()) < 3 * noise


# -- commands -------------------------------------------------------------------------------------
def test_refstats_and_score_commands(tmp_path, capsys, gmm):
    out = tmp_path / "gmm.safetensors"
    assert main(["refstats", "--testbed", "gmm", "--n", "3000", "--data-seed", "5",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 3000 and summary["extractor"] == "identity"
    assert str(out) in summary["written"]

    argv = ["score", "--model", "gmm", "--schedule", "karras", "--steps", "4", "--n", "64",
            "--checkpoints", "32", "--ref-stats", str(out), "--guidance", "1", "--device", "cpu"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 64 and got["nfe"] == 4 and set(got["fid_at"]) == {"32", "64"}
    prov = got["provenance"]
    assert prov["schedule"] == {"name": "karras", "steps": 4, "rho": 7.0}
    assert len(prov["sigmas"]) == 5 and prov["sigmas"][-1] == 0
    assert prov["prompts"]["seeds"] == [0, 63] and prov["prompts"]["source"] == "classes:4@seed0"
    assert prov["extractor"]["extractor"] == "identity" and prov["reference"]["n"] == 3000
    assert prov["fingerprint"] == gmm.fingerprint() and prov["schedsearch_version"]
    # the command scores what the library scores
    ref = RefStats.load(str(out))
    res = _scorer(gmm, ref, 64, batch_size=64, checkpoints=(32,)).score(schedules.karras(4))
    assert got["fid"] == res.fid and got["kid"] == res.kid

    bad = tmp_path / "bad.safetensors"
    other = CleanFID(torch.nn.Identity(), "some-net")
    RefStats.from_features(np.random.default_rng(0).normal(size=(20, 16)), extractor=other,
                           source="x").save(str(bad))
    assert main(argv[:-6] + ["--ref-stats", str(bad)]) == 2
    assert "'some-net' extractor, but scoring uses 'identity'" in capsys.readouterr().err


# -- the digits testbed ---------------------------------------------------------------------------
def _digits():
    from schedsearch.metrics.features import digits as digits_features
    try:
        from schedsearch.models.digits import WeightsError
    except ImportError:
        return None
    try:
        return load("digits", device="cpu"), digits_features()
    except WeightsError:
        return None


DIGITS = _digits()
needs_digits = pytest.mark.skipif(DIGITS is None, reason="the digits testbed weights are not built")


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    from schedsearch.metrics.refstats import default_refstats

    model, ext = DIGITS
    return default_refstats(model, ext, cache=str(tmp_path_factory.mktemp("cache")))


@needs_digits
def test_the_proxy_ranks_step_counts_on_the_digits_testbed(digits_ref):
    """Karras DPM++2M on the same prompts and seeds, guidance 1 (so that more steps means closer to
    the model's own distribution): 5 steps score worse than 20, and 100 steps land within the noise
    of 50. The noise is the spread of the 20-step FID over disjoint seed sets: the eight 32-image
    blocks of a 256-image run (positions 0-31, 32-63, ...; the classes cycle, so each block holds
    every class)."""
    model, ext = DIGITS
    lo, hi = model.table.sigma_min, model.table.sigma_max
    pset = prompts.load("classes:10", 256, seed=0)
    scorer = Scorer(model, ext, digits_ref, pset, guidance=1.0, batch_size=256, checkpoints=(128,),
                    kid_subsets=0)
    r20 = scorer.score(schedules.karras(20, lo, hi))
    head = Scorer(model, ext, digits_ref, pset.take(0, 128), guidance=1.0, batch_size=128,
                  checkpoints=(), kid_subsets=0)
    f3, f5 = (head.score(schedules.karras(k, lo, hi)).fid for k in (3, 5))
    # subsets nest, so the first 128 images of the 256-image run are the 20-step score at n = 128
    assert f3 > f5 > r20.fid_at[128]

    block_fid = [scorer.fid_of(r20.features[i:i + 32]) for i in range(0, 256, 32)]
    noise = float(np.std(block_fid, ddof=1))
    first = Scorer(model, ext, digits_ref, pset.take(0, 32), guidance=1.0, batch_size=32,
                   checkpoints=(), kid_subsets=0)
    f50, f100 = (first.score(schedules.karras(k, lo, hi)).fid for k in (50, 100))
    print(f"digits FID, guidance 1, n=128: 3 steps {f3:.3f}, 5 steps {f5:.3f}, 20 steps "
          f"{r20.fid_at[128]:.3f}; n=32: 50 steps {f50:.4f}, 100 steps {f100:.4f}, 20 steps "
          f"{block_fid[0]:.4f}, seed-set spread {noise:.3f}")
    assert abs(f100 - f50) < noise / 4
    assert abs(f50 - block_fid[0]) < noise   # 20 steps have converged too, on the same seeds


@needs_digits
def test_score_command_with_no_arguments_scores_the_digits_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    assert main(["score"]) == 0
    got = json.loads(capsys.readouterr().out)
    prov = got["provenance"]
    assert prov["schedule"]["name"] == "karras" and got["nfe"] == 8 and prov["solver"] == "dpmpp_2m"
    assert prov["extractor"]["extractor"] == DIGITS[1].name
    assert "held-out" in prov["reference"]["source"] and got["fid"] > 0 and got["kid"] is not None


# -- a text-to-image model, end to end ------------------------------------------------------------
def test_refstats_and_score_on_a_tiny_stable_diffusion_with_an_inception_file(tmp_path, monkeypatch,
                                                                                 capsys):
    """The real-model path: reference statistics from an image folder with the `inception`
    extractor (a stand-in network in clean-fid's TorchScript format: the real file cannot be
    downloaded here), then `score` on text prompts with FreeU on."""
    from test_metrics import _Base, _write_folder
    from tiny import save_pipeline, tiny_sd_pipeline

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_Base()).save(str(weights))
    monkeypatch.setenv("SCHEDSEARCH_INCEPTION", str(weights))
    real = _write_folder(tmp_path / "real", 12, 0, 0.0, sizes=((64, 64),))
    ref_file = tmp_path / "ref.safetensors"
    assert main(["refstats", "--images", real, "--out", str(ref_file), "--device", "cpu"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["extractor"] == "inception-v3-cleanfid" and made["resize"] == "clean"
    assert made["n"] == 12 and made["dim"] == 2048

    model_dir = save_pipeline(tiny_sd_pipeline(), tmp_path / "sd")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red car\na cat on a mat\na bowl of fruit\na lighthouse\n" * 3)
    argv = ["score", "--model", model_dir, "--schedule", "sd15-5", "--solver", "dpm++1s",
            "--freeu", "1.1,1.1,0.9,0.2", "--prompts", str(prompt_file), "--n", "3",
            "--checkpoints", "", "--batch-size", "3", "--guidance", "5.5",
            "--ref-stats", str(ref_file), "--device", "cpu", "--grid", str(tmp_path / "g.png")]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["nfe"] == 5 and set(got["fid_at"]) == {"3"} and got["fid"] > 0
    prov = got["provenance"]
    assert prov["freeu"]["steps"][0] == {"b1": 1.1, "b2": 1.1, "s1": 0.9, "s2": 0.2}
    assert prov["prompts"]["source"] == "prompts.txt@seed0" and prov["frechet"] == "auto"
    assert prov["extractor"] == {"extractor": "inception-v3-cleanfid", "resize": "clean"}
    assert (tmp_path / "g.png").is_file()
    # FreeU changes the images, hence the score
    assert main(argv[:7] + argv[9:]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] != got["fid"]


def test_score_a_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    assert main(["score", "--model", "gmm", "--preset", "sd15-8", "--n", "32", "--checkpoints", ""]) == 0
    got = json.loads(capsys.readouterr().out)
    from schedsearch import presets
    p = presets.load("sd15-8")
    assert got["nfe"] == 8 and got["provenance"]["solver"] == "dpmpp_2m"
    assert got["provenance"]["sigmas"] == p.sigmas.tolist() and got["provenance"]["guidance"] == 5.5


def test_score_says_why_kid_is_missing_with_statistics_made_without_features(tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    stats = tmp_path / "no-features.safetensors"
    assert main(["refstats", "--testbed", "gmm", "--no-features", "--out", str(stats)]) == 0
    capsys.readouterr()
    assert main(["score", "--model", "gmm", "--ref-stats", str(stats), "--n", "64"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["kid"] is None and json.loads(out)["fid"] > 0
    assert err.strip().splitlines()[-1] == (
        f"note: no KID: the reference statistics {stats} hold mu and sigma only (made with "
        f"--no-features); remake them without it for KID")


@pytest.mark.parametrize("flag, path, message", [
    ("--grid", "grid.txt", "--grid 'grid.txt': give an image file name"),
    ("--grid", "blocker/g.png", "cannot write --grid 'blocker/g.png' (not a folder at"),
    ("--save-images", "blocker", "cannot write --save-images 'blocker' (not a folder at"),
])
def test_score_refuses_an_output_it_cannot_write_before_the_model(flag, path, message, tmp_path,
                                                                 monkeypatch, capsys):
    """--grid and --save-images were written during and after the model calls: a bad path
    failed there, with a raw errno line and the scores unprinted. The model named here does not
    exist, so the output's message coming first shows nothing else was attempted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    assert main(["score", "--model", str(tmp_path / "no-such-model"), flag, path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_score_writes_its_grid_and_images_into_new_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    grid_png, images = tmp_path / "new" / "dir" / "g.png", tmp_path / "images"
    assert main(["score", "--n", "16", "--checkpoints", "", "--grid", str(grid_png),
                 "--save-images", str(images), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] > 0
    from PIL import Image
    assert Image.open(grid_png).size[0] > 0 and len(list(images.glob("*.png"))) == 16


def test_a_one_dimensional_testbed_scores_against_the_closed_form(tmp_path, monkeypatch):
    """clean-fid's Fréchet distance failed for 1-d features (SciPy's sqrtm returns a bare array for
    a 1×1 matrix, which `covmean, _ = ...` cannot unpack): the whole score failed after sampling."""
    from schedsearch.metrics.score import build_scorer
    from schedsearch.models.gmm import GaussianMixture

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    model = GaussianMixture.default(dim=1)
    scorer = build_scorer(model, n=64, checkpoints=(32,), kid_subsets=10)
    res = scorer.score(schedules.karras(5))
    f, ref = res.features[:, 0], scorer.ref
    assert ref.dim == 1 and res.features.shape == (64, 1)

    def closed(x):   # (m1 − m2)² + s1 + s2 − 2·√(s1·s2)
        s1, s2 = x.var(ddof=1), float(ref.sigma[0, 0])
        return (x.mean() - float(ref.mu[0])) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)

    assert res.fid == pytest.approx(closed(f), rel=1e-12)
    assert res.fid_at[32] == pytest.approx(closed(f[:32]), rel=1e-12)
    assert res.kid == pytest.approx(kid(ref.features, res.features, num_subsets=10), rel=1e-10)


def test_identity_statistics_of_a_grayscale_folder_have_the_samples_dimension(tmp_path, capsys,
                                                                             gmm):
    """An 8×8 grayscale folder was read as RGB under --extractor identity: 192-d statistics, where
    a one-channel 8×8 model's samples give 64, so `score` failed only after sampling. The folder
    is now read as stored, and a dimension known before sampling is checked then."""
    from PIL import Image

    folder = tmp_path / "gray"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "gray.safetensors"
    assert main(["refstats", "--images", str(folder), "--out", str(out), "--extractor",
                 "identity", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 64
    ref = RefStats.load(str(out))
    first = np.asarray(Image.open(folder / "00.png"), np.float64).ravel() / 255
    assert np.array_equal(ref.features[0], first.astype(np.float32))
    # gmm's samples are 16-d: said when the scorer is built, before any image is sampled
    with pytest.raises(ValueError) as info:
        _scorer(gmm, ref, 16)
    assert str(info.value) == ("the identity extractor gives 16-d features for gmm-d16-k12's "
                               "samples (16,), but the reference statistics are 64-d; make them "
                               "from data of the same shape")
    assert main(["score", "--model", "gmm", "--extractor", "identity", "--ref-stats", str(out),
                 "--n", "16", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("are 64-d; make them from data of the same "
                                                    "shape")
    if DIGITS is not None:   # a one-channel 8×8 model scores against them
        assert main(["score", "--model", "digits", "--extractor", "identity", "--ref-stats",
                     str(out), "--n", "16", "--checkpoints", "", "--device", "cpu",
                     "--no-progress"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["provenance"]["reference"]["dim"] == 64 and got["fid"] > 0
