"""The objective of the search: FID (and KID) of a schedule on a fixed prompt subset.

Generation, feature extraction and statistics run batch by batch in memory. The prompt set is read
in order, so its prefixes are the growing subsets: FID is reported at each checkpoint size, and
a caller's ``on_checkpoint(n, fid)`` may raise to stop a poor candidate early. Batches never
straddle a checkpoint, so the features of the first n images do not depend on how many more are
scored.

Candidates are only comparable at the same n with the same prompts and seeds (common random
numbers); at n below the feature dimension FID is biased upward, which is why KID (unbiased) is
reported next to it (see docs/scoring.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import prompts as _prompts, schedules, solvers
from ..models import BUILTIN, Model, default_guidance, default_prompts
from ..version import __version__
from ..sampler import FirstCalls, sample
from . import features
from .fid import KernelDistance, frechet_distance, frechet_distance_lowrank, kid, statistics
from .refstats import RefStats, default_refstats, no_reference_data

STAGES = ("sampling", "model", "solver", "decode", "features", "statistics", "total")
# "clip" joins the stages when a CLIP score is computed (a separate metric, never part of FID).


class ScoreError(ValueError):
    """A candidate that cannot be scored (non-finite samples or features); the message says why."""


@dataclass
class ScoreResult:
    fid: float
    kid: Optional[float]
    n: int
    fid_at: dict                      # n -> FID at each checkpoint (the last is n itself)
    nfe: int                          # model calls per image
    seconds: dict                     # STAGES -> seconds
    images: Optional[torch.Tensor] = None       # the first keep_images images, for grids
    features: Optional[np.ndarray] = field(default=None, repr=False)   # (n, D) generated features
    clip: Optional[float] = None      # mean CLIP score, when the Scorer has a ClipScore

    def as_dict(self) -> dict:
        out = {"fid": self.fid, "kid": self.kid, "n": self.n,
               "fid_at": {str(k): v for k, v in self.fid_at.items()}, "nfe": self.nfe,
               "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
        if self.clip is not None:
            out["clip"] = self.clip
        return out


class Scorer:
    """Scores σ lists against fixed reference statistics on a fixed prompt set.

    ``frechet``: ``"cleanfid"`` always uses clean-fid's sqrtm; ``"lowrank"`` the equivalent N×N
    eigenproblem; ``"auto"`` (default) the low-rank route when n < D (e.g. 256 Inception features,
    where one 2048² sqrtm costs ~30 s on two CPU cores), clean-fid's otherwise.
    ``clip``: a ``features.ClipScore`` to also report the mean CLIP score (text prompts only).
    ``share_first_calls``: serve the first model call of each batch from a cache when an earlier
    σ list started at the same σ_0 (the same images bit for bit, one call fewer per list).
    """

    def __init__(self, model, extractor, ref, prompt_set, *, guidance: Optional[float] = None,
                 batch_size: int = 16, checkpoints: Sequence[int] = (64, 128, 256),
                 kid_subsets: int = 100, kid_seed: int = 0, frechet: str = "auto", clip=None,
                 share_first_calls: bool = True):
        ref.check(extractor)
        if len(prompt_set) < 2:
            raise ValueError(f"scoring needs at least 2 prompts, got {len(prompt_set)}")
        if ref.features is not None and ref.features.shape[1] != ref.dim:
            raise ValueError("reference features and moments disagree in dimension")
        dim = _known_dim(model, extractor)
        if dim is not None and dim != ref.dim:   # now, not after the first batch is sampled
            raise ValueError(f"the {extractor.name} extractor gives {dim}-d features for "
                             f"{model.name}'s samples {tuple(model.latent_shape)}, but the "
                             f"reference statistics are {ref.dim}-d; make them from data of "
                             "the same shape")
        if frechet not in ("auto", "cleanfid", "lowrank"):
            raise ValueError(f"frechet must be auto, cleanfid or lowrank, got {frechet!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.extractor, self.ref, self.prompts = model, extractor, ref, prompt_set
        self.guidance = default_guidance(model.family) if guidance is None else float(guidance)
        self.batch_size = int(batch_size)
        self.n = len(prompt_set)
        cps = sorted({int(c) for c in checkpoints if 2 <= int(c) < self.n})
        self.checkpoints = tuple(cps) + (self.n,)
        self.kid_subsets, self.kid_seed, self.frechet = int(kid_subsets), int(kid_seed), frechet
        self.clip = clip
        # every σ list from the same σ_0 shares its first model call per batch (sampler.FirstCalls)
        self.first_calls = FirstCalls() if share_first_calls else None
        self.last_seconds: dict = {}
        self._ref_trace = ref.trace
        import cleanfid.fid  # noqa: F401  (imports torchvision, ~3 s once: not a scoring cost)
        # the candidate-independent half of KID (subset draws, reference sums), done once
        self._kid = None
        if ref.features is not None and self.kid_subsets > 0:
            self._kid = KernelDistance(ref.features, self.n, seed=self.kid_seed,
                                       num_subsets=self.kid_subsets)

    # -- statistics -----------------------------------------------------------------------------
    def fid_of(self, features: np.ndarray) -> float:
        n, d = features.shape
        if self.frechet == "lowrank" or (self.frechet == "auto" and n < d):
            return frechet_distance_lowrank(features, self.ref.mu, self.ref.sigma, self._ref_trace)
        mu, sigma = statistics(features)
        return frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma)

    def kid_of(self, features: np.ndarray) -> Optional[float]:
        """clean-fid's KID against the reference (its argument order for a generator)."""
        if self.ref.features is None or self.kid_subsets < 1:
            return None
        if self._kid is not None and features.shape[0] == self.n:
            return self._kid(features)
        return kid(self.ref.features, features, seed=self.kid_seed, num_subsets=self.kid_subsets)

    # -- the objective --------------------------------------------------------------------------
    def _slices(self):
        """Batches of at most batch_size that end exactly at each checkpoint."""
        start = 0
        for stop_at in self.checkpoints:
            while start < stop_at:
                stop = min(start + self.batch_size, stop_at)
                yield start, stop
                start = stop

    def score(self, sigmas, solver: str = "dpmpp_2m", freeu=None,
              on_checkpoint: Optional[Callable[[int, float], None]] = None, keep_images: int = 16,
              on_batch: Optional[Callable[[int, torch.Tensor], None]] = None,
              keep_features: bool = True) -> ScoreResult:
        """FID/KID of a σ list. ``on_checkpoint(n, fid)`` runs at each checkpoint (also at the full
        n) and may raise to stop early; the exception propagates unchanged. ``on_batch(start,
        images)`` sees every batch of images (e.g. to save them). Raises ScoreError on non-finite
        samples or features."""
        sigmas = schedules.flow_explicit(sigmas)   # a flow model's list starts at ∞
        solver = solvers.canonical(solver)
        t_start = time.perf_counter()
        sec = dict.fromkeys(STAGES + (("clip",) if self.clip is not None else ()), 0.0)
        # where the last call's time went, filled as it runs: a caller whose on_checkpoint stops
        # the call early (a pruned trial) still gets the account
        self.last_seconds = sec
        clip_scores: list[np.ndarray] = []
        feats: list[np.ndarray] = []
        kept: list[torch.Tensor] = []
        fid_at: dict[int, float] = {}
        nfe = solvers.model_calls(solver, sigmas)
        for start, stop in self._slices():
            images, nfe = self._images(sigmas, solver, freeu, start, stop, sec)
            if sum(map(len, kept)) < keep_images:
                kept.append(images[: keep_images - sum(map(len, kept))].clone())
            if on_batch is not None:
                on_batch(start, images)
            feats.append(self._features(images, start, stop, sec))
            if self.clip is not None:
                t4 = time.perf_counter()
                clip_scores.append(self.clip(images, self.prompts.prompts[start:stop]))
                sec["clip"] += time.perf_counter() - t4
            if stop in self.checkpoints:
                feats = [np.concatenate(feats)]
                fid_at[stop] = self._checkpoint(feats[0], stop, sec)
                sec["total"] = time.perf_counter() - t_start
                if on_checkpoint is not None:
                    on_checkpoint(stop, fid_at[stop])
        t3 = time.perf_counter()
        kid_value = self.kid_of(feats[0])
        sec["statistics"] += time.perf_counter() - t3
        sec["total"] = time.perf_counter() - t_start
        return ScoreResult(
            fid=fid_at[self.n], kid=kid_value, n=self.n, fid_at=fid_at, nfe=int(nfe), seconds=sec,
            images=torch.cat(kept) if kept else None, features=feats[0] if keep_features else None,
            clip=float(np.concatenate(clip_scores).mean()) if clip_scores else None)

    def _images(self, sigmas, solver, freeu, start: int, stop: int, sec: dict):
        """Images start..stop of the prompt set, checked finite; (images, model calls each)."""
        t0 = time.perf_counter()
        try:
            out = sample(self.model, sigmas, self.prompts.prompts[start:stop],
                         self.prompts.seeds[start:stop], solver=solver, guidance=self.guidance,
                         freeu=freeu, batch_size=self.batch_size, first_calls=self.first_calls)
        except solvers.NonFiniteError as exc:
            raise ScoreError(f"{exc} (images {start}..{stop - 1} of the prompt set)") from exc
        sec["sampling"] += time.perf_counter() - t0
        for key in ("model", "solver", "decode"):
            sec[key] += out.seconds.get(key, 0.0)
        if not bool(torch.isfinite(out.images).all()):
            raise ScoreError(f"the decoded images {start}..{stop - 1} are not finite")
        return out.images, out.nfe

    def _features(self, images: torch.Tensor, start: int, stop: int, sec: dict) -> np.ndarray:
        t1 = time.perf_counter()
        f = self.extractor(images)
        sec["features"] += time.perf_counter() - t1
        if not np.isfinite(f).all():
            raise ScoreError(f"the features of images {start}..{stop - 1} are not finite")
        if f.shape[1] != self.ref.dim:
            raise ValueError(f"the extractor gives {f.shape[1]}-d features, the reference "
                             f"statistics are {self.ref.dim}-d")
        return f

    def _checkpoint(self, features: np.ndarray, n: int, sec: dict) -> float:
        t2 = time.perf_counter()
        fid = self.fid_of(features)
        sec["statistics"] += time.perf_counter() - t2
        if not np.isfinite(fid):
            raise ScoreError(f"FID at n = {n} is not finite")
        return fid

    # -- provenance -----------------------------------------------------------------------------
    def provenance(self) -> dict:
        return {"model": self.model.name, "fingerprint": self.model.fingerprint(),
                "guidance": self.guidance, "prompts": self.prompts.as_json(),
                "extractor": self.extractor.describe(), "reference": self.ref.provenance(),
                "checkpoints": list(self.checkpoints), "frechet": self.frechet,
                "kid": {"subsets": self.kid_subsets, "seed": self.kid_seed},
                "clip": self.clip.path if self.clip is not None else None,
                "schedsearch_version": __version__}


# testbeds whose decoded samples have the latent shape (their decode maps values, not sizes)
_SHAPE_KEEPING = ("gmm", "digits", "gmm-flow", "digits-flow")


def _known_dim(model, extractor) -> Optional[int]:
    """The feature dimension a model's samples will have, where it is known before sampling: the
    identity extractor on a testbed gives one feature per value of a sample."""
    if isinstance(extractor, features.Identity) and model.family in _SHAPE_KEEPING:
        return int(np.prod(model.latent_shape))
    return None


def check_before_loading(model_spec: str, *, extractor: Optional[str] = None,
                         inception: Optional[str] = None, ref_stats: Optional[str] = None,
                         clip: Optional[str] = None) -> Optional[RefStats]:
    """What scoring a model that is not a testbed needs and can be checked before its weights
    load (minutes for a large pipeline): a CLIP folder if asked for, Inception's weights and a
    readable reference statistics file, returned (None when none is given to a testbed, which
    brings its own) so that ``scoring_setup`` takes it as read rather than reading it again
    (hundreds of MB with features)."""
    if clip:
        features.check_clip_folder(clip)
    if inception and (extractor or ("inception" if model_spec not in BUILTIN else None)) \
            != "inception":   # it used to be ignored: a FID not computed the way it was asked
        raise ValueError(f"--inception is used only with --extractor inception; {model_spec} "
                         f"scores with {'the ' + extractor if extractor else 'its own'} "
                         f"extractor (add --extractor inception to score with Inception)")
    if model_spec in BUILTIN:   # loads in a second, and brings its own reference data
        return RefStats.load(ref_stats) if ref_stats else None
    if (extractor or "inception") == "inception":
        features.find_inception(inception)
    if not ref_stats:
        raise ValueError(no_reference_data(model_spec))
    return RefStats.load(ref_stats)


def scoring_setup(model: Model, *, extractor: Optional[str] = None,
                  inception: Optional[str] = None,
                  ref_stats: Optional[str | RefStats] = None, device=None) -> tuple:
    """(extractor, reference statistics): ``extractor`` (inception|digits|identity; default: the
    model's natural one), ``inception`` (weights path), ``ref_stats`` (a file, or statistics
    already read; None: the testbed's cached default). Refuses mismatched statistics."""
    device = device or model.device
    ext = features.build(extractor, model=model, device=device, inception_path=inception)
    ref = (ref_stats if isinstance(ref_stats, RefStats) else RefStats.load(ref_stats)
           if ref_stats else default_refstats(model, ext, device=device))
    ref.check(ext)
    return ext, ref


def build_scorer(model: Model, *, prompts: Optional[str] = None, n: int = 256,
                 prompt_seed: int = 0, ref_stats: Optional[str] = None,
                 extractor: Optional[str] = None, inception: Optional[str] = None, device=None,
                 **kwargs) -> Scorer:
    """A Scorer with the defaults of the built-in testbeds: ``classes:K`` prompts, the model's
    natural extractor, and the cached default reference statistics (``ref_stats`` names a file
    otherwise)."""
    ext, ref = scoring_setup(model, extractor=extractor, inception=inception,
                             ref_stats=ref_stats, device=device)
    pset = _prompts.load(prompts or default_prompts(model), n, prompt_seed)
    return Scorer(model, ext, ref, pset, **kwargs)
