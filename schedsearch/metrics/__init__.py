"""The FID proxy: feature extractors, FID/KID, reference statistics, and the scorer the search
optimises (see docs/scoring.md).
``from schedsearch.metrics.score import Scorer, ScoreResult, ScoreError``."""

from .fid import fid_folders, fid_from_features, frechet_distance, kid
from .refstats import RefStats, default_refstats
from .score import (Scorer, ScoreError, ScoreResult, build_scorer, check_before_loading,
                    scoring_setup)

__all__ = ["RefStats", "ScoreError", "ScoreResult", "Scorer", "default_refstats", "fid_folders",
           "fid_from_features", "frechet_distance", "kid", "build_scorer", "check_before_loading",
           "scoring_setup"]
