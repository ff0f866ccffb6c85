"""What one study process works with: the loaded model, the search and held-out prompt sets, the
feature extractor and reference statistics, and a scorer per prompt set."""

from __future__ import annotations

from typing import Callable

from . import models, presets, prompts
from .config import StudyConfig
from .metrics import ScoreResult, Scorer, scoring_setup
from .metrics.features import ClipScore
from .presets import Preset
from .space import Target


class Context:
    """The loaded model, prompt subsets and scorers of one study in one process."""

    def __init__(self, config: StudyConfig, echo: Callable[[str], None] = print):
        self.config = config
        kwargs = {k: getattr(config, k) for k in ("height", "width") if getattr(config, k)}
        echo(f"loading model {config.model} ...")
        self.model: models.Model = models.load(config.model, device=config.device,
                                                dtype=config.dtype, **kwargs)
        self.family = self.model.family
        self.guidance = (config.guidance if config.guidance is not None
                         else models.default_guidance(self.family))
        source = self.prompt_source = config.prompts or models.default_prompts(self.model)
        self.search_set, self.heldout_set = prompts.split(
            source, config.n_search, config.n_heldout, config.prompt_seed,
            caption_column=config.caption_column)
        self.freeu_ok = self.model.unet is not None
        self.extractor, self.ref = scoring_setup(
            self.model, extractor=config.extractor, inception=config.inception,
            ref_stats=config.ref_stats, device=config.device)
        self.clip = None
        if config.clip:
            self.clip = ClipScore(config.clip, device=self.model.device)
        self.artifacts = True       # plots, sample grids and preset JSON per run (--no-artifacts)
        self._scorers: dict = {}

    @property
    def target(self) -> Target:
        return Target(budget=self.config.budget, table=self.model.table, family=self.family,
                      guidance=self.guidance, freeu_ok=self.freeu_ok)

    def scorer(self, which: str, guidance: float) -> Scorer:
        key = (which, guidance)
        if key not in self._scorers:
            pset = self.search_set if which == "search" else self.heldout_set
            cps = self.config.resolved_checkpoints() if which == "search" else (len(pset),)
            self._scorers[key] = Scorer(self.model, self.extractor, self.ref, pset,
                                        guidance=guidance, batch_size=self.config.batch_size,
                                        checkpoints=tuple(cps), clip=self.clip)
        return self._scorers[key]

    def score(self, preset: Preset, which: str = "search", on_checkpoint=None,
              keep_images: int = 0) -> ScoreResult:
        return self.scorer(which, preset.guidance).score(
            preset.sigmas, solver=preset.solver, freeu=preset.freeu, on_checkpoint=on_checkpoint,
            keep_images=keep_images)

    def provenance(self) -> dict:
        return presets.provenance(
            model=self.config.model, model_fingerprint=self.model.fingerprint(),
            prompts=self.search_set.as_json(), heldout=self.heldout_set.as_json(),
            extractor=self.extractor.name)
