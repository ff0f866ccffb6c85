"""FID/KID against clean-fid itself, feature extractors, and reference-statistics files."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from schedsearch.metrics import features as F
from schedsearch.metrics import fid as M
from schedsearch.metrics.refstats import ExtractorMismatch, RefStats, default_refstats


class TinyConvNet(torch.nn.Module):
    """A fixed random network with clean-fid's input convention ((B, 3, 299, 299) in [0, 255]),
    so clean-fid's own pipeline can run without downloading Inception."""

    def __init__(self, seed: int = 0, dim: int = 12):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 7, stride=4)
        self.conv2 = torch.nn.Conv2d(8, dim, 5, stride=4)
        self.eval()

    def forward(self, x):
        x = (x - 128) / 128
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return 20 * x.mean(dim=(2, 3))


def _write_folder(folder, n, seed, shift, sizes=((32, 32),), gray_every=0, level=127):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = level + 100 * np.sin(xx / (3 + shift) + rng.uniform(0, 6)) * np.cos(yy / 5)
        arr = np.clip(base[..., None] + rng.normal(0, 30 + 20 * shift, (h, w, 3)), 0, 255)
        arr = arr.astype(np.uint8)
        if gray_every and i % gray_every == 0:
            Image.fromarray(arr[..., 0], mode="L").save(os.path.join(folder, f"img{i:03d}.png"))
        else:
            Image.fromarray(arr).save(os.path.join(folder, f"img{i:03d}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    a = _write_folder(root / "a", 30, 0, 0.0, sizes=((32, 32), (40, 28)), gray_every=7)
    b = _write_folder(root / "b", 26, 1, 1.0, level=70)
    return a, b


@pytest.fixture(scope="module")
def net():
    return TinyConvNet()


def test_fid_of_two_folders_equals_clean_fid(folders, net):
    from cleanfid import fid as cf

    a, b = folders
    ext = F.CleanFID(net, "tiny", batch_size=8)
    ours = M.fid_folders(a, b, ext)
    theirs = cf.compute_fid(a, b, mode="clean", custom_feat_extractor=net, num_workers=0,
                            batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours > 1  # a real difference between the folders, not 0 == 0
    # clean-fid averages float32 features in float32; we average in float64. That is the only
    # difference (next assertions), worth ~1e-7 relative.
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    kw = dict(num_workers=0, batch_size=8, device=torch.device("cpu"), mode="clean", verbose=False)
    fa, fb = cf.get_folder_features(a, net, **kw), cf.get_folder_features(b, net, **kw)
    assert np.array_equal(M.folder_features(a, ext), fa.astype(np.float64))
    assert np.array_equal(M.folder_features(b, ext), fb.astype(np.float64))
    # refstats' progress bar: advanced by each batch's images, to the folder's count
    seen = []
    bar = type("Bar", (), {"update": lambda self, k: seen.append(k)})()
    assert np.array_equal(M.folder_features(a, ext, num=19, progress=bar), fa[:19])
    assert seen == [8, 8, 3]
    assert ours == pytest.approx(cf.fid_from_feats(fa.astype(np.float64), fb.astype(np.float64)),
                                 rel=1e-12)


def test_kid_equals_clean_fid_and_leaves_the_global_rng_alone(folders, net):
    from cleanfid import fid as cf

    a, b = folders
    kw = dict(num_workers=0, batch_size=8, device=torch.device("cpu"), mode="clean", verbose=False)
    fa, fb = cf.get_folder_features(a, net, **kw), cf.get_folder_features(b, net, **kw)
    np.random.seed(3)
    theirs = cf.kernel_distance(fa, fb)           # what compute_kid does between two folders
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    ours = M.kid_folders(a, b, F.CleanFID(net, "tiny", batch_size=8), seed=3)
    assert np.array_equal(np.random.get_state()[1], before)
    # float32 features summed in float64 by both, but through different BLAS calls: the last bits
    # of float32 move with the library build (1e-7 relative seen), nothing more
    assert ours == pytest.approx(theirs, abs=1e-9, rel=1e-6)
    assert ours > 1e-3
    # the seed matters (subsets are random), so it is part of the score's definition
    assert M.kid(fa, fb, seed=4) != M.kid(fa, fb, seed=3)


@pytest.mark.parametrize("n_ref,n_gen,max_subset", [(359, 256, 1000), (120, 200, 1000),
                                                     (300, 250, 90)])
def test_kernel_distance_with_cached_reference_equals_clean_fids(n_ref, n_gen, max_subset):
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(n_ref)
    ref = np.abs(rng.normal(size=(n_ref, 24))) * 2
    kd = M.KernelDistance(ref, n_gen, seed=7, num_subsets=40, max_subset_size=max_subset)
    state = np.random.get_state()
    for shift in (0.0, 0.3):      # two generated sets against the same cached reference half
        gen = np.abs(rng.normal(size=(n_gen, 24))) * 2 + shift
        np.random.seed(7)
        expected = kernel_distance(ref, gen, num_subsets=40, max_subset_size=max_subset)
        np.random.set_state(state)
        assert kd(gen) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert M.kid(ref, gen, seed=7, num_subsets=40, max_subset_size=max_subset) == \
        pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="set up for"):
        kd(gen[:-1])


def test_kernel_distance_works_through_the_reference_in_blocks_with_the_same_result():
    """The generated-reference kernel matrix was built whole: n_gen × n_ref float64 and its
    temporaries (0.6 GB for a 40k reference). Now one block of reference rows at a time: equal to
    the whole-matrix formula and to clean-fid's kernel_distance,
    with memory bounded by the block."""
    import tracemalloc

    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(3)
    ref, gen = rng.normal(size=(301, 10)), rng.normal(size=(120, 10)) + 0.2
    whole = M.KernelDistance(ref, 120, seed=2, num_subsets=30, chunk=10 ** 6)
    k_gr = (gen @ ref.T / 10 + 1) ** 3          # the former formula's cross term, whole matrix
    cross = np.einsum("ki,ki->k", whole.gen_sel @ k_gr, whole.ref_sel)
    k_gg = (gen @ gen.T / 10 + 1) ** 3
    gen_sums = np.einsum("ki,ki->k", whole.gen_sel @ k_gg, whole.gen_sel) - \
        whole.gen_sel @ np.diag(k_gg)
    m = whole.m
    former = float(((gen_sums + whole.ref_sums) / (m - 1) - cross * 2 / m).sum() / 30 / m)
    # to the last bits only: the class runs its products on one BLAS thread, this test on several
    assert whole(gen) == pytest.approx(former, rel=1e-14)
    np.random.seed(2)
    theirs = kernel_distance(ref, gen, num_subsets=30)
    for chunk in (1, 7, 100, 300, 301):
        got = M.KernelDistance(ref, 120, seed=2, num_subsets=30, chunk=chunk)(gen)
        assert got == pytest.approx(former, rel=1e-12) and got == pytest.approx(theirs, rel=1e-10)
    # 500 generated against 20 000 reference rows: the whole matrix is 80 MB (and the formula
    # made two such arrays at once); a call now peaks at one 32 MB block and small arrays
    big_ref, big_gen = rng.normal(size=(20_000, 8)), rng.normal(size=(500, 8))
    kd = M.KernelDistance(big_ref, 500, seed=0, num_subsets=5)
    tracemalloc.start()
    try:
        value = kd(big_gen)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 45e6, peak
    np.random.seed(0)
    assert value == pytest.approx(kernel_distance(big_ref, big_gen, num_subsets=5), rel=1e-10)


def test_in_memory_images_give_the_features_of_the_same_images_on_disk(tmp_path, net):
    from schedsearch.images import save_images

    ext = F.CleanFID(net, "tiny", batch_size=5)
    g = torch.Generator().manual_seed(0)
    for channels in (3, 1):
        images = torch.rand(7, channels, 24, 20, generator=g)
        folder = tmp_path / f"c{channels}"
        save_images(images, str(folder), [f"{i}.png" for i in range(7)])
        from_disk = M.folder_features(str(folder), ext)
        in_memory = ext(images)
        assert in_memory.dtype == np.float64 and in_memory.shape == (7, 12)
        assert np.array_equal(in_memory, from_disk)


@pytest.mark.skipif(not os.path.isfile(os.environ.get(F.INCEPTION_ENV) or F.CLEANFID_DEFAULT),
                    reason="clean-fid's inception-2015-12-05.pt is not on this machine (no "
                           "internet here); put it at /tmp/inception-2015-12-05.pt or set "
                           "SCHEDSEARCH_INCEPTION to run this test")
def test_inception_features_equal_clean_fid(folders):
    from cleanfid import fid as cf
    from cleanfid.inception_torchscript import InceptionV3W

    a, _ = folders
    weights = F.find_inception()
    ext = F.inception(weights, batch_size=8)
    net = InceptionV3W(path=F._inception_dir(weights), download=False, resize_inside=False).eval()
    # features rather than FID: with 2048-d features the FID code is the same as above, and each
    # 2048² sqrtm costs ~30 s on a small CPU
    theirs = cf.get_folder_features(a, net, num_workers=0, batch_size=8,
                                    device=torch.device("cpu"), mode="clean", verbose=False)
    assert theirs.shape == (30, 2048)
    assert np.array_equal(M.folder_features(a, ext), theirs.astype(np.float64))


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 8, 13, stride=13)
        self.head = torch.nn.Linear(8, 2048)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class _Base(torch.nn.Module):
    """The interface of clean-fid's TorchScript Inception file (``layers`` and ``forward(x,
    return_features)``), with a random stand-in network, to test the offline loading path."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_a_user_provided_inception_file_is_loaded_through_clean_fid(tmp_path, monkeypatch, folders):
    from cleanfid import fid as cf
    from cleanfid.inception_torchscript import InceptionV3W

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)
    stored = tmp_path / "weights" / "my-inception.pt"   # any name; we link it under clean-fid's
    stored.parent.mkdir()
    torch.jit.script(_Base()).save(str(stored))
    ext = F.inception(str(stored), batch_size=8)
    assert ext.name == "inception-v3-cleanfid" and ext.resize == "clean"
    a, _ = folders
    linked = F._inception_dir(str(stored))
    assert os.path.realpath(os.path.join(linked, F.INCEPTION_FILE)) == str(stored)
    reference_net = InceptionV3W(path=linked, download=False, resize_inside=False).eval()
    # features, not FID: a 2048² sqrtm takes a minute on a busy two-core machine
    theirs = cf.get_folder_features(a, reference_net, num_workers=0, batch_size=8,
                                    device=torch.device("cpu"), mode="clean", verbose=False)
    assert theirs.shape == (30, 2048)
    assert np.array_equal(M.folder_features(a, ext), theirs.astype(np.float64))
    # the environment variable works as well as the flag
    monkeypatch.setenv(F.INCEPTION_ENV, str(stored))
    assert F.find_inception() == str(stored)
    # a cache that cannot be written: the link goes to a temporary folder ('No such file' before)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(blocker / "cache"))
    elsewhere = F._inception_dir(str(stored))
    assert not elsewhere.startswith(str(tmp_path))
    assert os.path.realpath(os.path.join(elsewhere, F.INCEPTION_FILE)) == str(stored)


def test_missing_inception_says_where_to_put_it_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError) as exc:
        F.inception()
    msg = str(exc.value)
    for part in (str(tmp_path / "nowhere.pt"), F.INCEPTION_URL, "/tmp/inception-2015-12-05.pt",
                 "SCHEDSEARCH_INCEPTION", "--inception"):
        assert part in msg
    # a file that is not TorchScript is refused with a clear error, not a stack trace
    bad = tmp_path / "inception-2015-12-05.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable clean-fid Inception"):
        F.inception(str(tmp_path))


def test_frechet_distance_of_known_gaussians():
    # N(0, I) vs N(m, 4I) in d dims: |m|² + d + 4d − 2·tr(2I) = |m|² + d
    d = 6
    m = np.arange(d, dtype=np.float64) / 3
    assert M.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(
        float(m @ m) + d, rel=1e-10)
    with pytest.raises(ValueError, match="different feature spaces"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("n,d", [(40, 120), (90, 30)])
def test_low_rank_frechet_equals_clean_fid(n, d):
    rng = np.random.default_rng(n)
    gen = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + 0.2
    ref = rng.normal(size=(4 * d, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    mu2, s2 = M.statistics(ref)
    mu1, s1 = M.statistics(gen)
    exact = M.frechet_distance(mu1, s1, mu2, s2)
    assert M.frechet_distance_lowrank(gen, mu2, s2) == pytest.approx(exact, rel=1e-7)


def test_statistics_refuse_a_single_sample():
    with pytest.raises(ValueError, match="at least 2"):
        M.statistics(np.zeros((1, 3)))


# -- reference statistics -------------------------------------------------------------------------
def test_refstats_round_trip_is_exact_and_records_provenance(tmp_path, net):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 12))
    ext = F.CleanFID(net, "tiny", batch_size=8)
    ref = RefStats.from_features(feats, extractor=ext, source="unit test", model="m")
    path = ref.save(str(tmp_path / "ref.safetensors"))
    back = RefStats.load(path)
    assert np.array_equal(back.mu, ref.mu) and np.array_equal(back.sigma, ref.sigma)
    assert np.array_equal(back.features, ref.features)
    assert back.meta == ref.meta
    prov = back.provenance()
    assert prov["extractor"] == "tiny" and prov["resize"] == "clean" and prov["n"] == 50
    assert prov["dim"] == 12 and prov["source"] == "unit test" and prov["model"] == "m"
    assert prov["schedsearch_version"] and prov["created"].endswith("+00:00")
    # moments are those of the stored (float32-precision) features
    np.testing.assert_allclose(back.mu, feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(back.sigma, np.cov(feats, rowvar=False), atol=1e-5)
    # the file is plain safetensors: an 8-byte header length, then a JSON header
    raw = open(path, "rb").read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "schedsearch-refstats/1"
    assert set(header) - {"__metadata__"} == {"mu", "sigma", "features"}


def test_refstats_refuse_another_extractor(net):
    ref = RefStats.from_features(np.random.default_rng(0).normal(size=(10, 12)),
                                 extractor=F.CleanFID(net, "tiny"), source="x")
    ref.check(F.CleanFID(net, "tiny"))
    with pytest.raises(ExtractorMismatch, match="'tiny' extractor, but scoring uses 'identity'"):
        ref.check(F.Identity())
    with pytest.raises(ExtractorMismatch, match="resize mode"):
        ref.check(F.CleanFID(net, "tiny", size=(64, 64)))


def test_refstats_load_errors(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match="schedsearch refstats"):
        RefStats.load(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        RefStats.load(str(junk))
    other = tmp_path / "other.safetensors"
    save_file({"mu": np.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not a schedsearch reference-statistics file"):
        RefStats.load(str(other))


def test_default_gmm_reference_matches_the_exact_moments_and_is_cached(tmp_path, monkeypatch):
    from schedsearch.models import load

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    model = load("gmm", device="cpu")
    ref = default_refstats(model)
    assert ref.extractor == "identity" and ref.n == 10_000 and ref.dim == 16
    mu, sigma = model.moments(class_ids=range(model.num_classes))
    # 10k samples: the sample moments sit within a few standard errors of the exact ones
    se = np.sqrt(np.diag(sigma) / ref.n)
    assert np.all(np.abs(ref.mu - mu) < 5 * se)
    assert np.abs(ref.sigma - sigma).max() < 0.05 * np.abs(sigma).max()
    assert ref.path.startswith(str(tmp_path))
    again = default_refstats(model)
    assert again.meta["created"] == ref.meta["created"] and np.array_equal(again.features,
                                                                           ref.features)


def _digits_available():
    try:
        from schedsearch.models.digits import WeightsError, load_classifier
    except ImportError:
        return False
    try:
        load_classifier()
        return True
    except WeightsError:
        return False


@pytest.mark.skipif(not _digits_available(), reason="the digits testbed weights are not built yet")
def test_default_digits_reference_is_the_heldout_split(tmp_path, monkeypatch):
    from schedsearch.models import load
    from schedsearch.models.digits import digits_data, load_classifier, to_unit

    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path))
    model = load("digits", device="cpu")
    ref = default_refstats(model)
    images, _ = digits_data("heldout")
    clf = load_classifier()
    expected = clf.features(to_unit(images)).double().numpy()
    assert ref.n == images.shape[0] and ref.extractor == clf.fingerprint()
    np.testing.assert_allclose(ref.features, expected.astype(np.float32), rtol=0, atol=0)
    assert "held-out" in ref.meta["source"]


# -- CLIP score -----------------------------------------------------------------------------------
def _tiny_clip(folder):
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=514, max_position_embeddings=77, bos_token_id=512,
                                      eos_token_id=513, pad_token_id=513, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, proc


def test_clip_score_is_100_times_the_clamped_cosine(tmp_path):
    model, proc = _tiny_clip(str(tmp_path / "clip"))
    scorer = F.ClipScore(str(tmp_path / "clip"), batch_size=3)
    images = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    texts = ["a cat", "a dog on grass", "red", "blue sky", "x"]
    got = scorer(images, texts)
    # the independent route: CLIP's own forward, whose logits are exp(logit_scale)·cos
    arrays = [a for a in (images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())]
    inputs = proc(text=texts, images=arrays, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        cos = out.logits_per_image.diag() / model.logit_scale.exp()
    np.testing.assert_allclose(got, (100 * cos.clamp(min=0)).numpy(), rtol=1e-5, atol=1e-4)
    assert (got > 0).any()
    with pytest.raises(ValueError, match="text prompts"):
        scorer(images[:2], [1, 2])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        F.ClipScore(str(tmp_path / "missing"))


def test_a_clip_folder_with_pickled_weights_only_is_refused_unread(tmp_path):
    """transformers would torch.load a pytorch_model.bin; only safetensors are read. The same
    folder with its safetensors is read (and a folder of neither used to be a traceback)."""
    model, _ = _tiny_clip(str(tmp_path / "clip"))
    weights = tmp_path / "clip" / "model.safetensors"
    assert weights.is_file()
    weights.rename(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "clip" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds no model.safetensors \(only safetensors weights "
                                         r"are read; a pytorch_model.bin is never unpickled\)"):
        F.ClipScore(str(tmp_path / "clip"))
    (tmp_path / "model.safetensors").rename(weights)
    assert F.ClipScore(str(tmp_path / "clip")).model.config.projection_dim == 16


# -- what an image folder may hold ----------------------------------------------------------------
def _gray_pngs(folder, n=2, size=8):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size), 40 * i + 10, np.uint8)).save(
            os.path.join(folder, f"img{i}.png"))
    return str(folder)


def test_huge_and_deep_images_are_refused_naming_the_file(tmp_path, capsys):
    """A 14000² one-bit PNG (24 KB) raised PIL's DecompressionBombError as a traceback; a 16-bit
    PNG was clipped at 255 by convert('L'/'RGB') (as clean-fid clips it) into a nearly white image:
    both are now one line naming the file and what to do."""
    from schedsearch.cli import main

    big = _gray_pngs(tmp_path / "big")
    Image.new("1", (14000, 14000)).save(os.path.join(big, "zhuge.png"))
    out = tmp_path / "x.safetensors"
    assert main(["refstats", "--images", big, "--out", str(out), "--extractor", "identity",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists()
    assert err.endswith("zhuge.png: image too large (196000000 pixels; PIL reads at most "
                        f"{2 * Image.MAX_IMAGE_PIXELS}); resize or remove it")
    deep = _gray_pngs(tmp_path / "deep")
    # 16-bit values up to 4080: clean-fid's convert('RGB') reads every one above 255 as 255
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).save(f"{deep}/i16.png")
    assert Image.open(f"{deep}/i16.png").mode == "I;16"
    Image.fromarray(np.ones((8, 8), np.float32)).save(f"{deep}/f32.tiff")
    for name, what in (("i16.png", "a 16-bit image (PIL mode I;16)"),
                       ("f32.tiff", "a 32-bit float image (PIL mode F)")):
        for channels in (None, 1, "stored"):
            with pytest.raises(ValueError) as info:
                M.read_image(f"{deep}/{name}", channels)
            assert str(info.value) == (f"{deep}/{name}: {what}; FID reads 8-bit images and would "
                                       "clip its values at 255: save it as 8-bit")


def test_npy_arrays_are_checked_and_converted_like_image_files(tmp_path, net):
    """.npy files went to the extractor unchecked: 1-d or 4-d arrays raised a RuntimeError deep
    in torch, float arrays in [0, 1] were divided by 255 again, uint16 passed with values up to
    65535, and a (H, W) array next to RGB PNGs was reported as mixing "8×8 and 8×8"."""
    from cleanfid import fid as cf

    rng = np.random.default_rng(0)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(6):   # uint8 RGB arrays: clean-fid reads them as they are, and so do we
        np.save(rgb / f"a{i}.npy", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    theirs = cf.get_folder_features(str(rgb), net, num_workers=0, batch_size=8, mode="clean",
                                    device=torch.device("cpu"), verbose=False)
    ours = M.folder_features(str(rgb), F.CleanFID(net, "tiny", batch_size=8))
    assert np.array_equal(ours, theirs.astype(np.float64)) and np.ptp(ours) > 0
    # gray and RGB arrays are converted as PIL converts image files of the same pixels
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    color = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for arr, name in ((gray, "g"), (gray[..., None], "g1"), (color, "c")):
        np.save(tmp_path / f"{name}.npy", arr)
        Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] == 3 else arr[..., 0]).save(
            tmp_path / f"{name}.png")
        for channels in (None, 3, 1, "stored"):
            from_npy = M.read_image(str(tmp_path / f"{name}.npy"), channels)
            assert np.array_equal(from_npy, M.read_image(str(tmp_path / f"{name}.png"), channels))
            assert from_npy.dtype == np.uint8 and from_npy.shape[-1] == (
                1 if channels == 1 or (channels == "stored" and name != "c") else 3)
    for name, arr in (("flat", np.zeros(64, np.uint8)),
                      ("batch", np.zeros((2, 8, 8, 3), np.uint8)),
                      ("unit", np.full((8, 8, 3), 0.5)),     # [0, 1] floats: divided by 255 again
                      ("deep", np.full((8, 8), 60000, np.uint16)),
                      ("four", np.zeros((8, 8, 4), np.uint8))):
        np.save(tmp_path / f"{name}.npy", arr)
        with pytest.raises(ValueError) as info:
            M.read_image(str(tmp_path / f"{name}.npy"))
        assert str(info.value) == (
            f"{tmp_path}/{name}.npy: a {arr.dtype} array of shape {arr.shape}; image folders take "
            "uint8 arrays of shape (H, W), (H, W, 1) or (H, W, 3) (values 0..255); convert it or "
            "remove it")
    # a gray and an RGB file of one size are named as such, not as "8×8 and 8×8"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", gray)
    Image.fromarray(color).save(mixed / "b.png")
    with pytest.raises(ValueError) as info:
        M.folder_features(str(mixed), F.Identity())
    assert str(info.value) == (f"the identity extractor needs images of one kind; this folder "
                               f"mixes {mixed}/a.npy (1 channel) and {mixed}/b.png (3 channels): "
                               "save them all as grayscale or all as RGB")


def test_folder_names_are_literal_and_symlinked_folders_are_not_entered(tmp_path):
    """The folder went into glob unescaped: ``imgs[1]`` matched nothing (a character class) and
    ``a*b`` also took the images of ``aXb``; a symlink back to the folder listed every image
    once per level of the loop."""
    import glob

    from cleanfid.utils import EXTENSIONS

    plain = _gray_pngs(tmp_path / "plain", n=3)
    _gray_pngs(tmp_path / "plain" / "sub" / "deeper", n=2)
    _gray_pngs(tmp_path / "plain" / ".hidden", n=2)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain" / ".dot.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain" / "upper.JPG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain" / "mixed.Png")
    # on a plain folder: the files clean-fid's glob finds, in its order
    cleanfid_way = sorted(f for ext in EXTENSIONS
                          for f in glob.glob(os.path.join(plain, f"**/*.{ext}"), recursive=True))
    assert M.list_images(plain) == cleanfid_way and len(cleanfid_way) == 6
    brackets = _gray_pngs(tmp_path / "imgs[1]", n=2)
    _gray_pngs(tmp_path / "imgs1", n=5)
    assert M.list_images(brackets) == [f"{brackets}/img0.png", f"{brackets}/img1.png"]
    star = _gray_pngs(tmp_path / "a*b", n=2)
    _gray_pngs(tmp_path / "aXb", n=3)
    assert M.list_images(star) == [f"{star}/img0.png", f"{star}/img1.png"]
    looped = _gray_pngs(tmp_path / "looped", n=2)
    os.symlink(looped, os.path.join(looped, "again"))
    os.symlink(plain, os.path.join(looped, "elsewhere"))
    os.symlink(os.path.join(plain, "img0.png"), os.path.join(looped, "linked.png"))
    assert M.list_images(looped) == [f"{looped}/img0.png", f"{looped}/img1.png",
                                     f"{looped}/linked.png"]


def test_refstats_out_must_name_a_file_and_a_single_image_is_refused_first(tmp_path, capsys,
                                                                          monkeypatch):
    """``--out newdir/`` wrote a file called newdir; a one-image folder loaded the extractor (here:
    Inception weights that are not there) and embedded the image before FID refused it."""
    from schedsearch.cli import main

    monkeypatch.chdir(tmp_path)
    folder = _gray_pngs(tmp_path / "imgs", n=3)
    for out in ("newdir/", "./", "."):
        assert main(["refstats", "--images", folder, "--out", out, "--extractor", "identity",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"schedsearch refstats: error: --out {out!r}: --out must name a file "
                       f"(e.g. {os.path.join(out, 'ref.safetensors')!r}), not a folder")
    assert not os.path.exists("newdir")
    one = _gray_pngs(tmp_path / "one", n=1)
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "no-weights-here"))
    assert main(["refstats", "--images", one, "--out", "ref.safetensors", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"schedsearch refstats: error: {one!r} holds one image ({one}/img0.png); FID needs at "
        "least 2 images (thousands for a useful reference)")


def test_frechet_distance_in_one_dimension_is_the_closed_form():
    """SciPy's sqrtm(disp=False) gives a bare array for 1×1, so clean-fid's two-value unpacking
    failed for every 1-d FID."""
    m1, s1, m2, s2 = 0.4, 2.25, -0.6, 0.25
    closed = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)   # 1 + 2.5 − 1.5 = 2
    assert M.frechet_distance([m1], [[s1]], [m2], [[s2]]) == pytest.approx(2.0, rel=1e-15)
    assert closed == pytest.approx(2.0, rel=1e-15)
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 2, (50, 1)), rng.normal(0, 1, (70, 1))
    expected = (a.mean() - b.mean()) ** 2 + a.var(ddof=1) + b.var(ddof=1) \
        - 2 * np.sqrt(a.var(ddof=1) * b.var(ddof=1))
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-12)
    # the N×N route adds √ of the rounding noise of its N − 1 zero eigenvalues: ~1e-7 relative
    assert M.frechet_distance_lowrank(a, *M.statistics(b)) == pytest.approx(expected, rel=1e-6)


def test_refstats_with_impossible_moments_or_counts_are_refused(tmp_path, net):
    """A sigma of -I gave FID -33, and n = -3 or dim = 0 loaded; a covariance of fewer samples
    than dimensions (singular, rounding below zero) still loads."""
    rng = np.random.default_rng(0)
    ext = F.CleanFID(net, "tiny")
    singular = RefStats.from_features(rng.normal(size=(5, 12)) * 50, extractor=ext, source="x")
    assert np.linalg.eigvalsh(singular.sigma)[0] < 0   # rounding: 7 zero eigenvalues, some < 0
    path = singular.save(str(tmp_path / "singular.safetensors"))
    assert RefStats.load(path).n == 5
    feats = rng.normal(size=(40, 12))
    cases = {"negative": (dict(sigma=-np.eye(12)), "sigma has a negative eigenvalue (-1), so it "
                          "is not a covariance matrix (FID against it can come out negative)"),
             "n": (dict(n="-3"), "metadata n = -3 and dim = 12; statistics need n >= 2 images and "
                   "dim >= 1"),
             # empty moments of a 0-d space, consistent with dim = 0: they loaded
             "dim": (dict(dim="0", mu=np.zeros(0), sigma=np.zeros((0, 0))),
                     "metadata n = 40 and dim = 0; statistics need n >= 2 images and dim >= 1")}
    for name, (change, message) in cases.items():
        ref = RefStats.from_features(feats, extractor=ext, source="x", keep_features=False)
        ref.mu, ref.sigma = change.pop("mu", ref.mu), change.pop("sigma", ref.sigma)
        ref.meta.update(change)
        path = ref.save(str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError) as info:
            RefStats.load(path)
        assert str(info.value) == (f"reference statistics {path!r}: {message}; rebuild it with "
                                   "`schedsearch refstats --images DIR --out FILE`")
