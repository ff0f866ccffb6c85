"""FID and KID on features, and FID between two image folders (see docs/scoring.md).

The distances are clean-fid's own functions; this module adds what clean-fid leaves to the
caller: float64 statistics, a seeded KID that leaves numpy's global RNG as it found it, quiet output
(clean-fid prints to stdout, which would corrupt our JSON), and a low-rank route to the same Fréchet
distance for small samples in high dimension.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from typing import Optional

import numpy as np
from PIL import Image


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = _features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _features(features, what: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) array, got shape {f.shape}")
    return f


@contextlib.contextmanager
def _quiet():
    # clean-fid prints its "adding eps to the diagonal" notice to stdout, and SciPy warns about the
    # argument clean-fid passes to sqrtm; send the first to stderr and drop the second.
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with contextlib.redirect_stdout(buf):
            yield
    if buf.getvalue():
        sys.stderr.write(buf.getvalue())


# Below this many multiply-adds per matrix product, one BLAS thread is faster than several: OpenBLAS
# threads spin while they wait, and on a busy machine (parallel search workers) small products ran
# 70x slower with two threads than with one (measured on the 2-core CI box).
_SMALL_WORK = 1 << 25


_CONTROLLER = None

# float64 entries of one block of KernelDistance's generated-reference kernel matrix (32 MB)
_KERNEL_BLOCK = 1 << 22


def _blas_threads(work: float):
    if work >= _SMALL_WORK:
        return contextlib.nullcontext()
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController  # optional: comes with scikit-learn
        except ImportError:  # without it, keep the default
            return contextlib.nullcontext()
        # finding the BLAS libraries scans the process's modules (~20 ms): once, not per call
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Fréchet distance, as a Python float."""
    from cleanfid.fid import frechet_distance as cf  # cleanfid: imports torchvision

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"the two statistics live in different feature spaces: "
                         f"{mu1.shape} and {mu2.shape} means")
    if mu1.shape == (1,) and sigma1.shape == (1, 1):
        # SciPy's sqrtm(disp=False) returns a bare array for a 1×1 matrix, so clean-fid's
        # `covmean, _ = sqrtm(...)` fails; in one dimension the square root is a scalar one
        s1, s2 = float(sigma1[0, 0]), float(sigma2[0, 0])
        if s1 < 0 or s2 < 0:
            raise ValueError(f"variances must be >= 0, got {s1} and {s2}")
        return float((mu1[0] - mu2[0]) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2))
    with _quiet(), _blas_threads(float(mu1.shape[-1]) ** 3):
        return float(cf(mu1, sigma1, mu2, sigma2))


def frechet_distance_lowrank(features: np.ndarray, mu2, sigma2, trace2: Optional[float] = None
                             ) -> float:
    """The same Fréchet distance as ``frechet_distance(statistics(features), mu2, sigma2)``,
    computed through an N×N eigenproblem instead of a D×D matrix square root.

    With A the centred features, Σ1 = AᵀA/(N−1), and the non-zero eigenvalues of Σ1Σ2 are those of
    the symmetric PSD matrix AΣ2Aᵀ/(N−1), so tr√(Σ1Σ2) = Σ√λ. For N = 256 Inception features this
    takes 0.1 s where sqrtm of the 2048×2048 product takes ~30 s on two CPU cores; the two agree to
    ~1e-7 relative (the tests check it).
    """
    f = _features(features, "features")
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (f.shape[1],):
        raise ValueError(f"the two statistics live in different feature spaces: "
                         f"{f.shape[1]}-d and {mu2.shape[0]}-d")
    mu1 = f.mean(axis=0)
    a = f - mu1
    with _blas_threads(float(n) * f.shape[1] ** 2):
        m = (a @ sigma2 @ a.T) / (n - 1)
        eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    tr1 = float(np.einsum("ij,ij->", a, a) / (n - 1))
    tr2 = float(np.trace(sigma2)) if trace2 is None else float(trace2)
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    mu1, s1 = statistics(features1)
    mu2, s2 = statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)


def kid(features1: np.ndarray, features2: np.ndarray, seed: int = 0, num_subsets: int = 100,
        max_subset_size: int = 1000) -> float:
    """clean-fid's KID (cubic polynomial kernel, unbiased, averaged over random subsets).

    clean-fid draws the subsets from numpy's *global* RNG; we seed it for reproducible scores and
    restore its previous state so callers' random streams are untouched.
    """
    from cleanfid.fid import kernel_distance  # cleanfid: imports torchvision

    f1, f2 = _features(features1, "features1"), _features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID between {f1.shape[1]}-d and {f2.shape[1]}-d features")
    if min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        with _blas_threads(float(m) * m * f1.shape[1]):
            return float(kernel_distance(f1, f2, num_subsets=num_subsets,
                                         max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


class KernelDistance:
    """clean-fid's KID of many generated sets against one reference, with the work that does not
    depend on the generated features done once.

    ``kid(ref, gen, seed)`` draws, for each subset, ``m`` generated and ``m`` reference rows from
    numpy's global RNG and sums cubic-kernel matrices. The draws depend only on the set sizes and
    the seed, and the reference-reference sums only on the draws, so both are computed here once;
    each call then needs one generated Gram matrix and one generated-reference kernel matrix instead
    of 100 rounds of three m×m×D products. Same estimator, same subsets as clean-fid's
    ``kernel_distance``; equal to it to ~1e-12 relative (summation order), which the tests check.
    On the digits testbed this took KID from 0.35 s to 0.02 s per candidate.
    """

    def __init__(self, ref_features: np.ndarray, n_gen: int, seed: int = 0,
                 num_subsets: int = 100, max_subset_size: int = 1000,
                 chunk: Optional[int] = None):
        ref = _features(ref_features, "reference features")
        if min(ref.shape[0], n_gen) < 2:
            raise ValueError("KID needs at least 2 samples on each side")
        self.ref, self.n_gen, self.dim = ref, int(n_gen), ref.shape[1]
        self.m = min(ref.shape[0], self.n_gen, max_subset_size)
        self.num_subsets = int(num_subsets)
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            draws = [(np.random.choice(self.n_gen, self.m, replace=False),
                      np.random.choice(ref.shape[0], self.m, replace=False))
                     for _ in range(self.num_subsets)]
        finally:
            np.random.set_state(state)
        # 0/1 indicators of each subset: sums over a subset become products with them
        self.gen_sel = np.zeros((self.num_subsets, self.n_gen))
        self.ref_sel = np.zeros((self.num_subsets, ref.shape[0]))
        for k, (ig, ir) in enumerate(draws):
            self.gen_sel[k, ig] = 1.0
            self.ref_sel[k, ir] = 1.0
        d, m = self.dim, self.m
        with _blas_threads(float(m) * m * d):
            # reference-reference sums off the diagonal, one per subset, as clean-fid computes them
            self.ref_sums = np.array([_offdiag_sum((ref[ir] @ ref[ir].T / d + 1) ** 3)
                                      for _, ir in draws])
        # reference rows per block of the generated-reference kernel: the whole n_gen × n_ref
        # matrix and its temporaries took 0.6 GB for 40k reference images; a block stays ~32 MB
        self.chunk = max(1, int(chunk) if chunk else _KERNEL_BLOCK // max(1, self.n_gen))

    def __call__(self, gen_features: np.ndarray) -> float:
        gen = _features(gen_features, "generated features")
        if gen.shape != (self.n_gen, self.dim):
            raise ValueError(f"KID set up for ({self.n_gen}, {self.dim}) features, got {gen.shape}")
        d, m = self.dim, self.m
        with _blas_threads(float(self.n_gen) * max(self.n_gen, self.ref.shape[0]) * d):
            k_gg = (gen @ gen.T / d + 1) ** 3
            gen_sums = np.einsum("ki,ki->k", self.gen_sel @ k_gg, self.gen_sel) \
                - self.gen_sel @ np.diag(k_gg)
            cross = np.zeros(self.num_subsets)
            for i in range(0, self.ref.shape[0], self.chunk):
                k_gr = gen @ self.ref[i:i + self.chunk].T
                k_gr /= d
                k_gr += 1
                k_gr **= 3     # in place: one block-sized array at a time
                cross += np.einsum("ki,ki->k", self.gen_sel @ k_gr,
                                   self.ref_sel[:, i:i + self.chunk])
                del k_gr   # else the next block is allocated while this one is still held
        t = (gen_sums + self.ref_sums) / (m - 1) - cross * 2 / m
        return float(t.sum() / self.num_subsets / m)


def _offdiag_sum(a: np.ndarray) -> float:
    return float(a.sum() - np.diag(a).sum())


# -- image folders --------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
    """The image files of a folder and its subfolders, ordered as clean-fid orders them.

    clean-fid globs ``folder/**/*.ext``; we walk the folder instead, with the same result on plain
    folders (names starting with a dot skipped, as glob skips them, extensions matched with their
    case, sorted paths), and two differences: a folder name holding glob characters (``imgs[1]``,
    ``a*b``) is taken literally, and symlinked subfolders are not entered, so a symlink loop
    cannot multiply the images (a symlinked file is read)."""
    from cleanfid.utils import EXTENSIONS  # cleanfid: imports torchvision

    if os.path.isfile(folder):
        raise ValueError(f"{folder!r} is a file, not a folder of images")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    suffixes = tuple(f".{ext}" for ext in EXTENSIONS)
    files = []
    for root, dirs, names in os.walk(folder):   # followlinks=False: symlinked folders are skipped
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(os.path.join(root, n) for n in names
                     if not n.startswith(".") and n.endswith(suffixes))
    files.sort()
    if not files:
        raise ValueError(f"no images in {folder!r} (looked for {', '.join(sorted(EXTENSIONS))})")
    return files


# PIL modes of more than 8 bits per channel: convert('L'/'RGB') clips their values at 255 (as
# clean-fid's reader does), which turns a 16-bit photo into a mostly white image
_DEEP_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit",
               "I;16B": "16-bit", "I;16N": "16-bit"}
_GRAY_MODES = ("1", "L", "LA")
NPY_ACCEPTED = "uint8 arrays of shape (H, W), (H, W, 1) or (H, W, 3)"


def read_image(path: str, channels=None) -> np.ndarray:
    """(H, W, C) uint8, read as clean-fid reads it (PIL → RGB), or grayscale when channels == 1,
    or as stored (grayscale files one channel, others RGB) when channels == "stored".

    Images of more than 8 bits per channel and ``.npy`` arrays other than uint8 (H, W[, 1|3]) are
    refused: clean-fid clips the first at 255 and would divide float arrays in [0, 1] by 255."""
    try:
        if path.endswith(".npy"):
            return _convert(_read_npy(path), channels)
        with Image.open(path) as img:
            if img.mode in _DEEP_MODES:
                raise _Refused(f"{path}: a {_DEEP_MODES[img.mode]} image (PIL mode {img.mode}); "
                               "FID reads 8-bit images and would clip its values at 255: save it "
                               "as 8-bit")
            if channels == 1 or (channels == "stored" and img.mode in _GRAY_MODES):
                return np.array(img.convert("L"))[..., None]
            return np.array(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        # PIL refuses to decode images of more than twice Image.MAX_IMAGE_PIXELS
        size = re.search(r"\d+ pixels", str(exc))
        raise ValueError(f"{path}: image too large ({size.group(0) if size else 'over PIL limit'}"
                         f"; PIL reads at most {2 * Image.MAX_IMAGE_PIXELS}); resize or remove "
                         "it") from None
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:   # PIL: damaged PNG chunks are SyntaxError
        if isinstance(exc, OSError) and exc.errno is not None:
            raise   # a file the system cannot read (permissions): the CLI says which and why
        raise ValueError(f"{path}: not a readable image ({exc}); remove or replace it") from None


class _Refused(Exception):
    """A readable file of a kind FID does not take (kept apart from PIL's own ValueErrors)."""


def _read_npy(path: str) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3))
    if arr.dtype != np.uint8 or not shape_ok or 0 in arr.shape:
        raise _Refused(f"{path}: a {arr.dtype} array of shape {arr.shape}; image folders take "
                       f"{NPY_ACCEPTED} (values 0..255); convert it or remove it")
    return arr if arr.ndim == 3 else arr[..., None]


def _convert(arr: np.ndarray, channels) -> np.ndarray:
    """An (H, W, 1|3) uint8 array converted as PIL converts an image file of that content."""
    if channels == "stored":
        return arr
    if channels == 1:
        return arr if arr.shape[-1] == 1 else np.array(Image.fromarray(arr).convert("L"))[..., None]
    # RGB: a gray array's value repeated, which is what convert('RGB') does to a gray file; an RGB
    # array as it is (clean-fid's own reader passes it on untouched)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def folder_features(folder: str, extractor, batch_size: Optional[int] = None,
                    num: Optional[int] = None, progress=None) -> np.ndarray:
    """Features of the images of a folder, read a batch at a time (``num``: the first num files;
    ``progress``: a tqdm-like bar, updated by the images of each batch)."""
    files = list_images(folder)[:num]
    bs = int(batch_size or getattr(extractor, "batch_size", 64))
    channels = getattr(extractor, "channels", None)
    out, first = [], None
    for i in range(0, len(files), bs):
        batch = files[i:i + bs]
        arrays = [read_image(f, channels) for f in batch]
        first = first or (arrays[0], batch[0])
        # against the folder's first image too: batches of one size each may still differ
        extractor.check_one_size([first[0], *arrays], [first[1], *batch])
        out.append(extractor.from_uint8(arrays, names=batch))
        if progress is not None:
            progress.update(len(batch))
    return np.concatenate(out)


def fid_folders(folder1: str, folder2: str, extractor, batch_size: Optional[int] = None) -> float:
    """FID between two image folders with our pipeline; equals clean-fid's ``compute_fid`` on the
    same folders with the same network."""
    return fid_from_features(folder_features(folder1, extractor, batch_size),
                             folder_features(folder2, extractor, batch_size))


def kid_folders(folder1: str, folder2: str, extractor, batch_size: Optional[int] = None,
                seed: int = 0) -> float:
    return kid(folder_features(folder1, extractor, batch_size),
               folder_features(folder2, extractor, batch_size), seed=seed)
