"""Reference statistics: the real-data side of FID and KID, with their provenance.

A file holds ``mu`` and ``sigma`` (float64) and the raw ``features`` (for KID) as safetensors
tensors, and its provenance as string metadata: extractor, resize mode, n, dim, source, created,
schedsearch version. No pickle anywhere: loading a file runs no code.

Features are kept at float32 precision (what the networks produce) and the moments are computed
from exactly those values, so a statistics object scores the same before and after a save/load
round trip.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .. import files
from ..models.digits import digits_data, to_unit
from ..version import __version__
from . import features as _features
from .fid import statistics

FORMAT = "schedsearch-refstats/1"
REQUIRED = ("format", "extractor", "resize", "n", "dim", "source", "created", "schedsearch_version")


class ExtractorMismatch(ValueError):
    """Reference statistics from another feature space than the one scoring uses."""


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray]
    meta: dict = field(default_factory=dict)
    path: Optional[str] = field(default=None, compare=False)   # file it was loaded from/saved to

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_features(cls, features: np.ndarray, *, extractor, source: str,
                      keep_features: bool = True, **extra) -> "RefStats":
        """``extractor``: the Extractor used (its name and resize mode are recorded)."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"reference features must be (N >= 2, D), got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("the reference features are not all finite")
        f = f.astype(np.float32).astype(np.float64)
        mu, sigma = statistics(f)
        meta = {
            "format": FORMAT,
            "extractor": extractor.name,
            "resize": getattr(extractor, "resize", "none"),
            "n": str(f.shape[0]),
            "dim": str(f.shape[1]),
            "source": str(source),
            "created": files.utc_now(),
            "schedsearch_version": __version__,
        }
        meta.update({k: str(v) for k, v in extra.items() if v is not None})
        return cls(mu, sigma, f if keep_features else None, meta)

    # -- accessors ------------------------------------------------------------------------------
    @property
    def extractor(self) -> str:
        return self.meta["extractor"]

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def trace(self) -> float:
        return float(np.trace(self.sigma))

    def provenance(self) -> dict:
        out = {k: v for k, v in self.meta.items() if k != "format"}
        out["n"], out["dim"] = self.n, self.dim
        out["has_features"] = self.features is not None
        return out

    def check(self, extractor) -> None:
        """Refuse to score in another feature space than the one the statistics were built in."""
        name = extractor if isinstance(extractor, str) else extractor.name
        if name != self.extractor:
            raise ExtractorMismatch(
                f"the reference statistics were computed with the {self.extractor!r} extractor, "
                f"but scoring uses {name!r}; FIDs across feature spaces mean nothing. Rebuild them "
                f"with `schedsearch refstats ... --extractor {_kind(name)}`, or score with the "
                f"extractor the statistics were made with")
        resize = getattr(extractor, "resize", None)
        if resize is not None and resize != self.meta.get("resize"):
            raise ExtractorMismatch(
                f"the reference statistics used resize mode {self.meta.get('resize')!r}, scoring "
                f"uses {resize!r}; rebuild them with the same pipeline")

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write atomically (several workers may build the same cache entry at once)."""
        tensors = {"mu": np.ascontiguousarray(self.mu, np.float64),
                   "sigma": np.ascontiguousarray(self.sigma, np.float64)}
        if self.features is not None:
            tensors["features"] = np.ascontiguousarray(self.features, np.float32)
        meta = {k: str(v) for k, v in self.meta.items()}
        files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str) -> "RefStats":
        if os.path.isdir(path):   # an image folder given where its statistics belong
            raise ValueError(f"{path!r} is a folder; reference statistics are one .safetensors "
                             "file: make it from an image folder with `schedsearch refstats "
                             "--images DIR --out FILE`")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference statistics file {path!r} does not exist; make one "
                                    "with `schedsearch refstats --images DIR --out FILE`")
        try:
            with safe_open(path, framework="np") as f:
                meta = dict(f.metadata() or {})
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path!r} is not a safetensors file ({exc}); reference statistics "
                             "are made with `schedsearch refstats`") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a schedsearch reference-statistics file (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r}); make one with "
                             "`schedsearch refstats`")
        mu, sigma, feats = _checked(path, meta, tensors)
        return cls(mu, sigma, feats, meta, path=path)


def _rebuild_hint(path: str, meta: dict) -> str:
    """How to make the file again: a testbed's statistics record the model they came from."""
    model = str(meta.get("model", ""))
    # longest names first: "digits-flow" also starts with "digits-"
    testbed = next((t for t in ("digits-flow", "gmm-flow", "digits", "gmm")
                    if model == t or model.startswith(t + "-")), None)
    if testbed and "model_fingerprint" in meta:
        return (f"rebuild it with `schedsearch refstats --testbed {testbed} --rebuild --out "
                f"{shlex.quote(str(path))}`")
    return "rebuild it with `schedsearch refstats --images DIR --out FILE`"


def _checked(path: str, meta: dict, tensors: dict) -> tuple:
    """(mu, sigma, features) of a loaded file, refused unless FID can use them: a NaN or an
    asymmetric sigma only shows up later as every trial failing in the matrix square root."""
    def bad(what: str) -> ValueError:
        return ValueError(f"reference statistics {path!r}: {what}; {_rebuild_hint(path, meta)}")

    missing = [k for k in REQUIRED if k not in meta] + [k for k in ("mu", "sigma")
                                                         if k not in tensors]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    try:
        n, d = int(meta["n"]), int(meta["dim"])
    except ValueError:
        raise bad(f"metadata 'n' ({meta['n']!r}) and 'dim' ({meta['dim']!r}) must be "
                  "integers") from None
    if n < 2 or d < 1:   # a covariance needs two samples; a feature space one dimension
        raise bad(f"metadata n = {n} and dim = {d}; statistics need n >= 2 images and dim >= 1")
    mu, sigma = tensors["mu"].astype(np.float64), tensors["sigma"].astype(np.float64)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise bad(f"mu {mu.shape} / sigma {sigma.shape} do not match dim {d}")
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            raise bad(f"{name} is not finite ({int((~np.isfinite(value)).sum())} NaN/inf values)")
    # Covariances computed in float32 or by np.cov are symmetric only up to rounding, so the
    # tolerance follows the matrix's own scale.
    scale = float(np.abs(sigma).max(initial=0.0))
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > 1e-6 * scale:
        raise bad("sigma is not symmetric, so it is not a covariance matrix")
    low = _lowest_eigenvalue(sigma)
    if low is not None:
        raise bad(f"sigma has a negative eigenvalue ({low:.3g}), so it is not a covariance "
                  "matrix (FID against it can come out negative)")
    feats = tensors.get("features")
    if feats is not None:
        feats = feats.astype(np.float64)
        if feats.shape != (n, d):
            raise bad(f"features {feats.shape} do not match n × dim ({n}, {d})")
        if not np.isfinite(feats).all():
            raise bad("features are not finite")
    return mu, sigma, feats


def _lowest_eigenvalue(sigma: np.ndarray) -> Optional[float]:
    """None when sigma is positive semi-definite up to rounding, else its lowest eigenvalue.

    A covariance of fewer samples than dimensions is singular, and rounding leaves its zero
    eigenvalues at about ±1e-16 of the largest, so eigenvalues down to -1e-6 of the largest
    diagonal entry (a lower bound on the largest eigenvalue) pass. Cholesky of sigma shifted by that
    tolerance succeeds exactly when none is lower: 0.1 s for 2048 × 2048, where eigvalsh takes
    seconds, which is run only to name the eigenvalue of a matrix already refused."""
    tol = 1e-6 * float(np.abs(np.diag(sigma)).max(initial=0.0))
    try:
        np.linalg.cholesky(sigma + (tol + np.finfo(float).tiny) * np.eye(sigma.shape[0]))
        return None
    except np.linalg.LinAlgError:
        return float(np.linalg.eigvalsh(sigma)[0])


def _kind(name: str) -> str:
    if name.startswith("inception"):
        return "inception"
    if name.startswith("digits"):
        return "digits"
    return name


# -- built-in testbeds ----------------------------------------------------------------------------
GMM_N = 10_000
GMM_SEED = 12345


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def no_reference_data(name: str) -> str:
    return (f"no built-in reference data for {name!r}; make statistics from real images with "
            f"`schedsearch refstats --images DIR --out FILE` and pass them with --ref-stats FILE")


def default_refstats(model, extractor=None, *, n: Optional[int] = None, seed: Optional[int] = None,
                     device=None, rebuild: bool = False, cache: Optional[str] = None) -> RefStats:
    """Reference statistics of a built-in testbed, built once and cached.

    * ``digits``: the held-out split of the digits data through the classifier (or ``extractor``).
    * ``gmm``: ``n`` exact samples (default 10 000, seeded), classes balanced, as the ``classes:K``
      prompt sets draw them.
    * ``digits-flow`` and ``gmm-flow``: the same data as their ε twins (the cache key still
      carries the model's fingerprint).
    """
    family = model.family
    if family not in ("digits", "gmm", "digits-flow", "gmm-flow"):
        raise ValueError(no_reference_data(model.name))
    if extractor is None:
        extractor = _features.build(model=model, device=device)
    gmm = family in ("gmm", "gmm-flow")
    if gmm:
        n = GMM_N if n is None else int(n)
        seed = GMM_SEED if seed is None else int(seed)
    else:
        seed = 0 if seed is None else int(seed)
    key = _safe(f"{model.fingerprint()}-{extractor.name}-n{n if n is not None else 'all'}-s{seed}")
    path = os.path.join(cache or files.cache_dir("refstats"), key + ".safetensors")
    if not rebuild and os.path.isfile(path):
        try:
            ref = RefStats.load(path)
            same_model = ref.meta.get("model_fingerprint") == model.fingerprint()
            if ref.extractor == extractor.name and same_model:
                return ref
        except ValueError:
            pass  # a stale or damaged cache entry: rebuild it below
    if gmm:
        k = model.num_classes
        data = model.sample_data([i % k for i in range(n)], seed=seed).float()
        feats = extractor(data)
        source = f"{model.name}: {n} exact samples, classes 0..{k - 1} in turn, seed {seed}"
    else:
        images = _digits_images(digits_data("heldout"))
        if n is not None:
            if n > images.shape[0]:
                raise ValueError(f"the held-out digits split has {images.shape[0]} images; asked "
                                 f"for {n}")
            images = images[:n]
        feats = extractor(images)
        source = f"digits held-out split ({images.shape[0]} images)"
    ref = RefStats.from_features(feats, extractor=extractor, source=source, model=model.name,
                                 model_fingerprint=model.fingerprint(), seed=seed)
    try:
        ref.save(path)
    except OSError as exc:   # a read-only or missing cache costs a rebuild next time, not the run
        warnings.warn(f"could not cache the reference statistics in {path} "
                      f"({exc.strerror or exc}); they are rebuilt next time: point "
                      f"SCHEDSEARCH_CACHE at a folder you can write to", files.CacheWarning,
                      stacklevel=2)
    return ref


def _digits_images(data):
    """``digits_data(split)`` gives (images in [-1, 1], labels); the model's decoder maps its
    samples to [0, 1] with ``to_unit``, so the reference goes through the same map."""
    images = data[0] if isinstance(data, (tuple, list)) else data
    return to_unit(images)
