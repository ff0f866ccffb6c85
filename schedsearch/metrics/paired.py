"""Paired bootstrap confidence intervals for FID_A − FID_B (docs/scoring.md, "Paired bootstrap
CIs").

A and B are sampled on the same held-out prompts and seeds, so row i of both feature arrays is the
same prompt and initial noise. One resample draws n row numbers with replacement and takes those
rows of *both* candidates; FID_A − FID_B of each resample, against the fixed reference statistics,
gives the bootstrap distribution of the difference (Efron and Tibshirani, *An Introduction to the
Bootstrap*, 1993). ``paired_difference_sets`` averages K disjoint held-out sets, resampling each
set independently in every draw.

**Which interval.** FID is biased upward at small n by roughly c/n, with c depending on the
candidate (Chong and Forsyth, CVPR 2020), so FID_A − FID_B at n = 200 carries (c_A − c_B)/n. A
bootstrap resample is again a small sample of the same size, so the bootstrap distribution is
shifted from the observed difference by about the same bias: its median is *not* the observed
difference. Measured on the digits testbed (five 5- and 20-step DPM++2M schedules, guidance 4,
each sampled on the same 4000 prompts and seeds, cut into 20 disjoint sets of 200; 1000 resamples
per set; "truth" = the difference of FID extrapolated to n → ∞ by a fit in 1/n over 400–4000
images):

* the bootstrap median sat 0.03–0.30 FID from the observed difference (mean over the sets, per
  pair), 0.1–1.3 bootstrap SDs; this shift varies little from set to set (SD 0.02–0.06), it is a
  property of the pair, and it has the sign of the n = 200 bias of the difference wherever that
  bias is not ≈ 0, at 30–110 % of its size (found − AYS sd15: shift +0.30, bias +0.38; AYS sd15 −
  Karras@20: −0.21 and −0.19);
* so the percentile interval, centred near observed + shift, counts the bias twice: it covered
  the n → ∞ difference in 66 % of the 200 set × pair intervals, and for AYS sd15 − Karras@20
  (−0.12 at n = 200, but +0.02 to +0.06 on 1000–4000 images) it declared AYS sd15 better in 8
  of 20 sets (the basic interval: in none; once it favoured Karras@20);
* the basic interval (the percentile interval reflected about the observed difference,
  2·delta − quantiles; Davison and Hinkley, *Bootstrap Methods and their Application*, 1997,
  §5.2) is centred near observed − shift, i.e. bias-corrected to first order: it covered 97 %
  (95–100 % in every pair), and for the one clear small-gap win (found − AYS sd15, −0.64 at
  n → ∞) it excluded zero in 13 of 20 sets, where the percentile interval never did;
* Efron's bias-corrected (BC) percentile interval covered 91.5 %: with shifts above one SD
  (z₀ ≈ −1.3) its lower end is the 2·10⁻⁶ quantile, i.e. the smallest of the 1000 draws.

Hence ``method="basic"`` by default; ``"percentile"`` and ``"bc"`` stay available. ``shift``
(bootstrap median − delta) is reported so a reader can see when the correction matters, and ``sd``
because the bootstrap SD ran 10–60 % above the spread of the difference across the disjoint sets
(the intervals are conservative). The basic interval targets the large-n difference; what a fresh
set of the same size shows is delta ± that spread, bias included (the basic interval covered that
91.5 %, the percentile one 96 %).

**Speed.** FID_r = ‖μ_r − μ_ref‖² + tr Σ_r + tr Σ_ref − 2 tr√(Σ_r Σ_ref) for every resample r.
Means and traces of all resamples are two products of the (resamples × n) count matrix with the
features. For the square-root term, with B the k distinct drawn rows centred on the resample's
mean and weighted by √count, (n−1)Σ_r = BᵀB, so the eigenvalues needed are those of
(BΣ_ref^{1/2})ᵀ(BΣ_ref^{1/2}) (D×D; Σ_ref^{1/2} once, by eigh) or, apart from zeros, of BΣ_refBᵀ
(k×k, gathered from K = F₀Σ_refF₀ᵀ computed once per candidate): each resample takes the smaller.
A resample holds k ≈ 0.63·n distinct rows, so the k×k route wins whenever 0.63·n < D, not only
when n < D. Dimensions up to 32 are decomposed as one stack. Resamples are split across
``threads`` Python threads (numpy's LAPACK call releases the GIL), one BLAS thread each.
``PairedBootstrap`` fixes the resample indices so that a study computes the winner's resampled
FIDs once and compares them with each baseline's.

Measured on the 2-core development machine while other jobs kept its load at 3–8 (so a second
thread found no free core), 1 + 6 candidates, 1000 resamples, clean-fid already imported:

* 200 × 128 (digits): 7.2–7.7 s CPU, 7.5–8.5 s wall with one thread; 8–12 s wall with two. Of
  this, 5.1 s are the 7000 eigenproblems of ~125×125 (0.55–0.75 ms each on this machine), which
  is the floor of an exact method; the 5 s target needs a second free core.
* 1000 × 2048 (Inception-sized, synthetic features): 244 s CPU (35 ms per resample, ~630×630
  eigenproblems), 493 s wall with one thread and 411 s with two under that load.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

from .fid import _features, frechet_distance, frechet_distance_lowrank, statistics

METHODS = ("basic", "percentile", "bc")
DEFAULT_METHOD = "basic"

# The smallest sets a paired interval is drawn from. Two candidates of one distribution (3-d
# Gaussians against N(0, I), 300 pairs per n, 200 resamples) had their 95 % basic interval exclude
# zero in 18 % of pairs at n = 3, 15 % at 4, 8 % at 5, 5 % at 6, 1.3 % at 8 and 0.3 % at 10: below
# ~8 images the interval is too narrow (n = 2 gives three distinct resamples, half of them one
# image twice). paired_difference(_sets) refuse fewer images; PairedBootstrap, which a study
# builds from its config, warns. With fewer than 100 resamples the 2.5 % and 97.5 % quantiles rest on fewer than
# 3 draws each, so the interval's ends are single draws.
MIN_IMAGES = 8
MIN_RESAMPLES = 100

# Up to this dimension the resamples' covariance matrices are built and decomposed as one stack
# (_STACK doubles at a time); above it, one resample at a time through the smaller eigenproblem.
_SMALL_DIM = 32
_STACK = 1 << 21


@dataclass(frozen=True)
class PairedDelta:
    """FID_A − FID_B on one set of images both candidates share, with its bootstrap interval.

    ``sd`` is the bootstrap standard deviation of the difference and ``shift`` the bootstrap median
    minus the observed difference: a shift comparable to ``sd`` means the bootstrap distribution is
    not centred on ``delta`` (FID's small-sample bias), which the ``basic`` interval corrects for
    (it is centred near delta − shift) and the ``percentile`` interval doubles.
    """
    delta: float
    lo: float
    hi: float
    fid_a: float
    fid_b: float
    n: int
    resamples: int
    method: str
    seed: int
    level: float
    sd: float
    shift: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_json(self) -> dict:
        out = asdict(self)
        out["excludes_zero"] = self.excludes_zero
        return out


@dataclass(frozen=True)
class PairedSets:
    """The mean of FID_A − FID_B over K disjoint held-out sets (``overall``: its fid_a/fid_b are
    means over the sets, its n the images of all sets) and each set's own result."""
    overall: PairedDelta
    per_set: tuple

    @property
    def delta(self) -> float:
        return self.overall.delta

    @property
    def lo(self) -> float:
        return self.overall.lo

    @property
    def hi(self) -> float:
        return self.overall.hi

    def as_json(self) -> dict:
        return {"sets": len(self.per_set), "overall": self.overall.as_json(),
                "per_set": [p.as_json() for p in self.per_set]}


def interval(draws: np.ndarray, observed: float, level: float = 0.95,
             method: str = DEFAULT_METHOD) -> tuple[float, float]:
    """A bootstrap interval from resampled values of a statistic and its observed value.

    ``percentile``: the quantiles of the draws. ``basic``: the percentile interval reflected about
    the observed value (2·observed − quantiles), which removes the bootstrap estimate of the bias.
    ``bc``: Efron's bias-corrected percentile interval.
    """
    d = np.asarray(draws, np.float64)
    if d.ndim != 1 or d.size < 2 or not np.isfinite(d).all():
        raise ValueError("an interval needs at least two finite resampled values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    if method == "percentile":
        lo, hi = np.quantile(d, [alpha, 1 - alpha])
    elif method == "basic":
        q_lo, q_hi = np.quantile(d, [alpha, 1 - alpha])
        lo, hi = 2 * observed - q_hi, 2 * observed - q_lo
    elif method == "bc":
        # z0 from the share of draws below the observed value (ties count half); clipped so a
        # bootstrap distribution lying entirely on one side gives the extreme draws, not ±inf
        share = (np.count_nonzero(d < observed) + 0.5 * np.count_nonzero(d == observed)) / d.size
        share = min(max(share, 0.5 / d.size), 1 - 0.5 / d.size)
        nd = NormalDist()
        z0, z = nd.inv_cdf(share), nd.inv_cdf(alpha)
        lo, hi = np.quantile(d, [nd.cdf(2 * z0 + z), nd.cdf(2 * z0 - z)])
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return float(lo), float(hi)


def _too_few(n) -> str:
    return (f"a paired bootstrap interval from {n} images per set excludes zero far more often "
            f"than its level says (at least {MIN_IMAGES} are needed; score more held-out images)")


def _check_images(n: int) -> None:
    if n < MIN_IMAGES:
        raise ValueError(_too_few(n))


class PairedBootstrap:
    """Resampled FIDs of n-image feature sets against fixed reference statistics, on one fixed set
    of bootstrap index vectors, so that the draws of several candidates are paired.

    ``indices[r]`` is resample r (n row numbers drawn with replacement, from
    ``np.random.default_rng([seed, set_index])``). Compute ``resampled_fids`` once per candidate
    and ``compare`` any two; the reference-only work (trace, Σ_ref^{1/2}) is done once.
    """

    def __init__(self, ref_mu, ref_sigma, n: int, resamples: int = 1000, seed: int = 0, *,
                 level: float = 0.95, method: str = DEFAULT_METHOD, set_index: int = 0,
                 threads: Optional[int] = None):
        self.mu2, self.sigma2 = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
        self.dim = self.mu2.shape[0] if self.mu2.ndim == 1 else -1
        if self.sigma2.shape != (self.dim, self.dim):
            raise ValueError(f"reference mu {self.mu2.shape} and sigma {self.sigma2.shape} do not "
                             "describe one feature space")
        # A study's held-out sets may be as small as its config allows (n_heldout >= 2), so this
        # building block takes them with a warning; paired_difference(_sets) refuse them.
        if int(n) < 2:
            raise ValueError(f"a paired bootstrap interval needs at least 2 images, got {n}")
        if int(n) < MIN_IMAGES:
            warnings.warn(_too_few(n) + "; it is computed, but do not read it as a decision",
                          stacklevel=2)
        if int(resamples) < MIN_RESAMPLES:
            raise ValueError(f"a paired bootstrap interval needs at least {MIN_RESAMPLES} "
                             f"resamples (1000 is the default), got {resamples}")
        for name, value in (("mu", self.mu2), ("sigma", self.sigma2)):
            if not np.isfinite(value).all():   # else LAPACK fails deep inside ("did not converge")
                raise ValueError(f"the reference {name} is not finite "
                                 f"({int((~np.isfinite(value)).sum())} NaN/inf values)")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.n, self.resamples, self.seed = int(n), int(resamples), int(seed)
        self.level, self.method, self.set_index = float(level), method, int(set_index)
        self.threads = threads
        self.tr2 = float(np.trace(self.sigma2))
        rng = np.random.default_rng([self.seed, self.set_index])
        self.indices = rng.integers(0, self.n, size=(self.resamples, self.n))
        # FID of a resample depends only on how often each image was drawn
        rows = np.arange(self.resamples)[:, None] * self.n
        self.counts = np.bincount((rows + self.indices).ravel(), minlength=self.resamples * self.n
                                  ).reshape(self.resamples, self.n).astype(np.float64)
        self.distinct = (self.counts > 0).sum(axis=1)   # k: the distinct images of a resample
        self._root: Optional[np.ndarray] = None

    # -- per candidate ----------------------------------------------------------------------------
    def check(self, features) -> np.ndarray:
        f = _features(features, "features")
        if f.shape != (self.n, self.dim):
            raise ValueError(f"bootstrap set up for ({self.n}, {self.dim}) features, got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("the features are not all finite")
        return f

    def fid(self, features) -> float:
        """The observed FID, computed as the Scorer computes it (``frechet="auto"``): clean-fid's
        Fréchet distance, or the equal low-rank route below the feature dimension."""
        f = self.check(features)
        if self.n < self.dim:
            return frechet_distance_lowrank(f, self.mu2, self.sigma2, self.tr2)
        mu, sigma = statistics(f)
        return frechet_distance(mu, sigma, self.mu2, self.sigma2)

    def resampled_fids(self, features) -> np.ndarray:
        """FID of each resample ``features[indices[r]]``, shape (resamples,)."""
        f = self.check(features)
        n = self.n
        center = f.mean(axis=0)
        f0 = f - center            # covariances are shift-invariant; centring avoids cancellation
        m0 = self.counts @ f0 / n  # each resample's mean, relative to the sample's
        diff = m0 + (center - self.mu2)
        dist = np.einsum("rd,rd->r", diff, diff)
        tr1 = (self.counts @ np.einsum("nd,nd->n", f0, f0) - n * np.einsum("rd,rd->r", m0, m0)
               ) / (n - 1)
        return dist + tr1 + self.tr2 - 2 * self._trace_sqrt(f0)

    def compare(self, a_fids, b_fids, fid_a: float, fid_b: float) -> PairedDelta:
        """A − B from both candidates' ``resampled_fids`` and observed FIDs."""
        draws = self._draws(a_fids, b_fids)
        return _result(draws, float(fid_a) - float(fid_b), float(fid_a), float(fid_b), self.n,
                       self)

    # -- internals --------------------------------------------------------------------------------
    def _draws(self, a_fids, b_fids) -> np.ndarray:
        a, b = np.asarray(a_fids, np.float64), np.asarray(b_fids, np.float64)
        if a.shape != (self.resamples,) or b.shape != (self.resamples,):
            raise ValueError(f"expected {self.resamples} resampled FIDs per candidate, got "
                             f"{a.shape} and {b.shape}")
        return a - b

    def root(self) -> np.ndarray:
        """Σ_ref^{1/2} (symmetric, by eigh), so that tr√(Σ Σ_ref) = Σ√eig(Σ_ref^{1/2} Σ Σ_ref^{1/2})
        with a symmetric PSD matrix in the middle."""
        if self._root is None:
            w, v = np.linalg.eigh((self.sigma2 + self.sigma2.T) / 2)
            self._root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return self._root

    def _trace_sqrt(self, f0: np.ndarray) -> np.ndarray:
        """tr√(Σ_r Σ_ref) for every resample r, through the smaller of two equal eigenproblems.

        With B the k distinct drawn rows, centred on the resample's mean and weighted by √count,
        (n−1)·Σ_r = BᵀB, so the eigenvalues of Σ_ref^{1/2} Σ_r Σ_ref^{1/2} are those of B'ᵀB' with
        B' = B Σ_ref^{1/2} (D×D) and, apart from zeros, those of B Σ_ref Bᵀ (k×k), over n−1.
        """
        gram = self.distinct < self.dim
        k = f0 @ self.sigma2 @ f0.T if gram.any() else None
        g = f0 @ self.root() if not gram.all() else None
        out = np.empty(self.resamples)
        rows = np.arange(self.resamples)
        if self.dim <= _SMALL_DIM and not gram.all():
            out[~gram] = _trace_sqrt_stacked(g, self.counts[~gram])
            rows = np.flatnonzero(gram)
        if len(rows):
            threads = self._threads()
            # a few blocks per thread, so that one slow block does not leave the others idle
            blocks = np.array_split(rows, min(len(rows), 4 * threads))

            def work(block: np.ndarray) -> list:
                return [self._trace_sqrt_one(r, k, g) for r in block]

            out[rows] = [v for part in _map(work, blocks, threads) for v in part]
        return out / math.sqrt(self.n - 1)

    def _trace_sqrt_one(self, r: int, k: Optional[np.ndarray], g: Optional[np.ndarray]) -> float:
        """(n−1)^{1/2}·tr√(Σ_r Σ_ref) of resample r: k×k from K = F₀ Σ_ref F₀ᵀ when it has fewer
        distinct rows than dimensions, else D×D from G = F₀ Σ_ref^{1/2}."""
        c = self.counts[r]
        s = np.flatnonzero(c)
        cs = c[s]
        w = np.sqrt(cs)
        if len(s) < self.dim:
            ks = k[s][:, s]
            u = ks @ cs / self.n       # centring on the resample's own mean, inside K
            mat = ks - u[:, None] - u[None, :] + (cs @ u) / self.n
            mat *= w[:, None] * w[None, :]
        else:
            gs = g[s]
            b = (gs - cs @ gs / self.n) * w[:, None]
            mat = b.T @ b              # numpy uses syrk for a product with its own transpose
        return float(np.sqrt(np.clip(np.linalg.eigvalsh(mat), 0, None)).sum())

    def _threads(self) -> int:
        if self.threads is not None:
            return max(1, int(self.threads))
        import torch  # the project's thread setting: workers run with torch.set_num_threads

        return max(1, torch.get_num_threads())


def _trace_sqrt_stacked(g: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(n−1)·tr√(Σ_ref^{1/2} Σ_r Σ_ref^{1/2}) for small D, all resamples at once: Σ_r comes from
    one product of the counts with the rows' outer products."""
    n, d = g.shape
    outer = np.einsum("ni,nj->nij", g, g).reshape(n, d * d)
    out = np.empty(len(counts))
    step = max(1, _STACK // (d * d))
    for i in range(0, len(counts), step):
        c = counts[i:i + step]
        m = c @ g / n
        mats = (c @ outer).reshape(-1, d, d) - n * m[:, :, None] * m[:, None, :]
        out[i:i + step] = np.sqrt(np.clip(np.linalg.eigvalsh(mats), 0, None)).sum(axis=1)
    return out


_CONTROLLER = None


def _one_blas_thread():
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController  # comes with scikit-learn
        except ImportError:
            return contextlib.nullcontext()
        _CONTROLLER = ThreadpoolController()   # finding the BLAS libraries takes ~20 ms: once
    return _CONTROLLER.limit(limits=1, user_api="blas")


def _map(work, blocks: list, threads: int) -> list:
    # One BLAS thread per block and blocks spread over Python threads (LAPACK releases the GIL):
    # a 128×128 eigenproblem is too small for BLAS threads, which spin on a busy machine.
    with _one_blas_thread():
        if threads == 1 or len(blocks) == 1:
            return [work(b) for b in blocks]
        with ThreadPoolExecutor(min(threads, len(blocks))) as ex:
            return list(ex.map(work, blocks))


def _result(draws: np.ndarray, delta: float, fid_a: float, fid_b: float, n: int,
            boot: PairedBootstrap) -> PairedDelta:
    lo, hi = interval(draws, delta, boot.level, boot.method)
    return PairedDelta(delta=delta, lo=lo, hi=hi, fid_a=fid_a, fid_b=fid_b, n=n,
                       resamples=boot.resamples, method=boot.method, seed=boot.seed,
                       level=boot.level, sd=float(np.std(draws, ddof=1)),
                       shift=float(np.median(draws) - delta))


def paired_difference(features_a, features_b, ref_mu, ref_sigma, *, resamples: int = 1000,
                      seed: int = 0, level: float = 0.95, method: str = DEFAULT_METHOD,
                      threads: Optional[int] = None) -> PairedDelta:
    """FID(A) − FID(B) against (ref_mu, ref_sigma), where row i of both feature arrays is the same
    held-out prompt and seed, with a paired bootstrap interval (the same resampled rows for both).
    """
    fa, fb = _features(features_a, "features_a"), _features(features_b, "features_b")
    if fa.shape != fb.shape:
        raise ValueError(f"paired features must have the same shape, got {fa.shape} and "
                         f"{fb.shape}")
    _check_images(fa.shape[0])
    boot = PairedBootstrap(ref_mu, ref_sigma, fa.shape[0], resamples, seed, level=level,
                           method=method, threads=threads)
    return boot.compare(boot.resampled_fids(fa), boot.resampled_fids(fb), boot.fid(fa),
                        boot.fid(fb))


def compare_sets(boots: Sequence[PairedBootstrap], a_fids: Sequence, b_fids: Sequence,
                 fid_a: Sequence[float], fid_b: Sequence[float]) -> PairedSets:
    """The mean of A − B over K disjoint sets, set k compared with ``boots[k]`` (built with
    ``set_index=k``, so the sets are resampled independently): each draw averages the K sets'
    paired differences, which is a paired bootstrap of the mean."""
    k = len(boots)
    if k == 0 or not len(a_fids) == len(b_fids) == len(fid_a) == len(fid_b) == k:
        raise ValueError("compare_sets needs one bootstrap, two resampled-FID arrays and two "
                         "observed FIDs per set")
    first = boots[0]
    if any((b.resamples, b.level, b.method, b.seed) !=
           (first.resamples, first.level, first.method, first.seed) for b in boots):
        raise ValueError("the sets' bootstraps differ in resamples, level, method or seed")
    if len({b.set_index for b in boots}) != k:
        raise ValueError("each set needs its own set_index: sets sharing resample indices are not "
                         "resampled independently")
    per_set = tuple(b.compare(a, bb, fa, fb)
                    for b, a, bb, fa, fb in zip(boots, a_fids, b_fids, fid_a, fid_b))
    draws = np.mean([b._draws(a, bb) for b, a, bb in zip(boots, a_fids, b_fids)], axis=0)
    overall = _result(draws, float(np.mean([p.delta for p in per_set])),
                      float(np.mean([p.fid_a for p in per_set])),
                      float(np.mean([p.fid_b for p in per_set])),
                      sum(b.n for b in boots), first)
    return PairedSets(overall, per_set)


def paired_difference_sets(pairs: Sequence, ref_mu, ref_sigma, *, resamples: int = 1000,
                           seed: int = 0, level: float = 0.95, method: str = DEFAULT_METHOD,
                           threads: Optional[int] = None) -> PairedSets:
    """``paired_difference`` over K disjoint held-out sets: ``pairs[k] = (features_a,
    features_b)`` of set k (sets may differ in size). Set k is resampled with ``set_index=k``, so
    K = 1 gives exactly ``paired_difference``."""
    boots, a_fids, b_fids, fid_a, fid_b = [], [], [], [], []
    for k, (fa, fb) in enumerate(pairs):
        fa, fb = _features(fa, "features_a"), _features(fb, "features_b")
        if fa.shape != fb.shape:
            raise ValueError(f"set {k}: paired features must have the same shape, got "
                             f"{fa.shape} and {fb.shape}")
        _check_images(fa.shape[0])
        boot = PairedBootstrap(ref_mu, ref_sigma, fa.shape[0], resamples, seed, level=level,
                               method=method, set_index=k, threads=threads)
        boots.append(boot)
        a_fids.append(boot.resampled_fids(fa))
        b_fids.append(boot.resampled_fids(fb))
        fid_a.append(boot.fid(fa))
        fid_b.append(boot.fid(fb))
    return compare_sets(boots, a_fids, b_fids, fid_a, fid_b)
