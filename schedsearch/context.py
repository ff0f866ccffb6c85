"""What one study process works with: the loaded model, the search and held-out prompt sets, the
feature extractor and reference statistics, and a scorer per prompt set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import models, presets, prompts
from .baselines import distill_prompts
from .config import SD_ONLY, StudyConfig
from .metrics import ScoreResult, Scorer, check_before_loading, scoring_setup
from .metrics.features import ClipScore
from .metrics.refstats import RefStats
from .presets import Preset
from .sampler import sample
from .space import Target


@dataclass
class Inputs:
    """What a study reads before its model: the prompt source, every prompt it samples (the
    search subset, then the held-out sets) and the reference statistics of a file it was given."""

    source: str
    prompts: prompts.PromptSet
    ref: Optional[RefStats]


def read_inputs(config: StudyConfig) -> Inputs:
    """The prompts, Inception's weights and the reference statistics, checked before any work: a
    large pipeline takes minutes to load, and a missing file should not wait for it (nor leave a
    new study behind)."""
    source = models.prompt_source(config.model, config.prompts)
    # the search subset, then K disjoint held-out sets further down the same prompt list (new
    # prompts where the source has them, new seeds always)
    n, h, k = config.n_search, config.n_heldout, config.heldout_sets
    full = prompts.load(source, n + k * h, config.prompt_seed,
                        caption_column=config.caption_column,
                        why=f"a prompt per image: --n-search {n} + {k} held-out set(s) × "
                            f"--n-heldout {h}; lower them, or repeat lines in the file")
    if config.baselines is None or {"gits", "oss"} & set(config.baselines):
        # GITS/OSS's teacher images: their own prompts, from the block after the study's; too
        # few lines failed both baselines after the model load and the first baselines
        distill_prompts(source, config)
    ref = check_before_loading(config.model, extractor=config.extractor,
                               inception=config.inception, ref_stats=config.ref_stats,
                               clip=config.clip)
    return Inputs(source, full, ref)


class Context:
    """The loaded model, prompt subsets and scorers of one study in one process."""

    def __init__(self, config: StudyConfig, echo: Callable[[str], None] = print,
                 inputs: Optional[Inputs] = None):
        self.config = config
        inputs = inputs or read_inputs(config)
        self.prompt_source = source = inputs.source
        full, ref = inputs.prompts, inputs.ref
        n, h, k = config.n_search, config.n_heldout, config.heldout_sets
        kwargs = {("config" if k == "model_config" else k): getattr(config, k)
                  for k in SD_ONLY if getattr(config, k) is not None}
        echo(f"loading model {config.model} ...")
        self.model: models.Model = models.load(config.model, device=config.device,
                                                dtype=config.dtype, **kwargs)
        self.family = self.model.family
        self.guidance = (config.guidance if config.guidance is not None
                         else models.default_guidance(self.family))
        models.check_prompts(self.model, full.prompts, source)
        self.search_set = full.take(0, n)
        self.heldout_sets = [full.take(n + i * h, n + (i + 1) * h) for i in range(k)]
        self.heldout_set = self.heldout_sets[0]
        # the search prompts with fresh seeds, from half a seed block away from every search and
        # held-out seed on: where the best few trials are re-scored before one is called the winner
        self.validation_sets = [self.search_set.reseeded(prompts.SEED_STRIDE // 2 + j * n)
                                for j in range(config.validation_sets)]
        self.freeu_ok = self.model.unet is not None
        self.extractor, self.ref = scoring_setup(
            self.model, extractor=config.extractor, inception=config.inception,
            ref_stats=ref or config.ref_stats, device=config.device)
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
        """The scorer of the search subset (``"search"``), of validation set j
        (``"validation"``, ``"validation:j"``) or of held-out set k (``"heldout"``,
        ``"heldout:k"``)."""
        key = (which, guidance)
        if key not in self._scorers:
            kind, _, k = which.partition(":")
            pset = (self.search_set if kind == "search" else
                    (self.validation_sets if kind == "validation" else self.heldout_sets)[int(k or 0)])
            cps = self.config.resolved_checkpoints() if which == "search" else (len(pset),)
            self._scorers[key] = Scorer(self.model, self.extractor, self.ref, pset,
                                        guidance=guidance, batch_size=self.config.batch_size,
                                        checkpoints=tuple(cps), clip=self.clip)
        return self._scorers[key]

    def score(self, preset: Preset, which: str = "search", on_checkpoint=None,
              keep_images: int = 0, keep_features: bool = False) -> ScoreResult:
        return self.scorer(which, preset.guidance).score(
            preset.sigmas, solver=preset.solver, freeu=preset.freeu, on_checkpoint=on_checkpoint,
            keep_images=keep_images, keep_features=keep_features)

    def sample_first(self, preset: Preset, n: int):
        """The first ``n`` images of the search subset with ``preset`` (as scoring samples them:
        the same prompts, seeds and batch give the same images bit for bit)."""
        k = min(n, len(self.search_set))
        out = sample(self.model, preset.sigmas, self.search_set.prompts[:k],
                     self.search_set.seeds[:k], solver=preset.solver, guidance=preset.guidance,
                     freeu=preset.freeu, batch_size=self.config.batch_size)
        return out.images

    def provenance(self) -> dict:
        return presets.provenance(
            model=self.config.model, model_fingerprint=self.model.fingerprint(),
            prompts=self.search_set.as_json(),
            heldout=[h.as_json() for h in self.heldout_sets] if len(self.heldout_sets) > 1
            else self.heldout_set.as_json(),
            extractor=self.extractor.name)
