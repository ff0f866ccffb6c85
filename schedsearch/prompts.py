"""Prompt sets with one fixed seed per prompt.

A prompt set is a deterministic function of (source, n, seed): the same arguments give the same
prompts and seeds on every machine, and a smaller n gives a prefix of a larger one, so subsets nest
(scores at n = 256 and n = 512 share their first 256 images). Seeds are ``seed·10⁶ + position``,
so a held-out set taken further down the same list never reuses a search seed.

Sources: a text file (one prompt per line), a COCO captions annotation file (the paper's protocol:
shuffle the image ids with the seed, one caption per image), a CSV file with a caption column, or
``classes:K`` for a class-conditional testbed (labels 0..K−1 in turn).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass

from .files import first_bad_byte

SEED_STRIDE = 1_000_000
# torch.Generator seeds are 64-bit; a prompt seed owns the whole block seed·10⁶ … seed·10⁶ + 10⁶ − 1
MAX_SEED = 2 ** 64
MAX_PROMPT_SEED = MAX_SEED // SEED_STRIDE


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple
    seeds: tuple
    source: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError("a prompt set needs one seed per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def reseeded(self, offset: int) -> "PromptSet":
        """The same prompts with other seeds (each moved by ``offset``): fresh noise for the same
        conditioning, e.g. a validation set that never meets a search or held-out seed."""
        return PromptSet(self.prompts, tuple(s + offset for s in self.seeds),
                         f"{self.source}+seeds{offset:+d}")

    def take(self, start: int, stop: int) -> "PromptSet":
        if stop > len(self):
            raise ValueError(f"asked for prompts {start}..{stop} of a set of {len(self)}; "
                             f"the source has too few prompts")
        return PromptSet(self.prompts[start:stop], self.seeds[start:stop],
                         f"{self.source}[{start}:{stop}]")

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([list(map(str, self.prompts)), list(self.seeds)]).encode())
        return h.hexdigest()[:16]

    def as_json(self) -> dict:
        return {"source": self.source, "n": len(self), "fingerprint": self.fingerprint(),
                "seeds": [self.seeds[0], self.seeds[-1]] if len(self) else []}


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def _read_csv(path: str, column: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{path}: no column {column!r} (columns: {reader.fieldnames}); "
                             f"name the caption column with --caption-column")
        return [row[column].strip() for row in reader if (row[column] or "").strip()]


def _read_coco(path: str, seed: int) -> list[str]:
    """One caption per image (the lowest annotation id), images shuffled by id with ``seed``."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno}); a .json prompt file must be a COCO captions "
                             "annotation file") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO captions file (no 'annotations' list)")
    first: dict = {}
    for a in data["annotations"]:
        try:
            key, ann_id, cap = a["image_id"], a.get("id", 0), a["caption"].strip()
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: every annotation needs image_id and caption") from None
        # COCO's ids are integers; a mix of types cannot be ordered, a list cannot be a key
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (key, ann_id)):
            raise ValueError(f"{path}: an annotation's image_id and id must be integers, got "
                             f"image_id {key!r}, id {ann_id!r}")
        if cap and (key not in first or ann_id < first[key][0]):
            first[key] = (ann_id, cap)
    ids = sorted(first)
    random.Random(seed).shuffle(ids)
    return [first[i][1] for i in ids]


def _read_file(path: str, seed: int, caption_column: str) -> list:
    """The prompts of a file, with every way of not being a prompt file said in one line."""
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not a prompt file; give a text file with one "
                         "prompt per line, a CSV with a caption column, a COCO captions .json, "
                         "or classes:K for a class-conditional testbed")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    low = path.lower()
    try:
        if low.endswith(".json"):
            return _read_coco(path, seed)
        if low.endswith(".csv"):
            return _read_csv(path, caption_column)
        return _read_lines(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text ({first_bad_byte(path)}); save the prompt "
                         "file as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {path!r}: {exc.strerror or exc}") from None


def check_prompt_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_PROMPT_SEED:
        raise ValueError(f"the prompt seed must be an integer in 0..{MAX_PROMPT_SEED - 1} (its "
                         f"images' seeds must fit a torch.Generator), got {seed!r}")


def load(source: str, n: int | None = None, seed: int = 0, *, caption_column: str = "caption",
         why: str = "") -> PromptSet:
    """Load ``n`` prompts (all when None) from ``source`` with seeds ``seed·10⁶ + i``. ``why``:
    where ``n`` comes from and how to ask for fewer, for the message when the file is short."""
    if n is not None and n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    if n is not None and n > SEED_STRIDE:   # more would take the next prompt seed's seeds
        raise ValueError(f"at most {SEED_STRIDE:,} images per prompt seed (image i gets seed "
                         f"prompt_seed·{SEED_STRIDE:,} + i), got {n:,}")
    check_prompt_seed(seed)
    if caption_column != "caption" and not source.lower().endswith(".csv"):
        # it used to be ignored: the prompts were not the column that was asked for
        raise ValueError(f"--caption-column {caption_column!r} applies to a CSV prompt file, not "
                         f"to {source!r}")
    if source.startswith("classes:"):
        try:
            k = int(source.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"write class prompts as classes:K, got {source!r}") from None
        if k < 1:
            raise ValueError(f"classes:K needs K >= 1, got {k}")
        count = k if n is None else n
        prompts = [i % k for i in range(count)]
    else:
        prompts = _read_file(source, seed, caption_column)
        if not prompts:
            raise ValueError(f"prompt file {source!r} holds no prompts; put one prompt per line")
        if n is not None:
            if n > len(prompts):
                raise ValueError(f"asked for {n} prompts but {source!r} holds only {len(prompts)}"
                                 + (f" ({why})" if why else ""))
            prompts = prompts[:n]
    seeds = [seed * SEED_STRIDE + i for i in range(len(prompts))]
    name = source if source.startswith("classes:") else os.path.basename(source)
    return PromptSet(tuple(prompts), tuple(seeds), f"{name}@seed{seed}")


def split(source: str, n_search: int, n_heldout: int, seed: int = 0, **kwargs
          ) -> tuple[PromptSet, PromptSet]:
    """The search subset (the first n_search) and a held-out set (the next n_heldout)."""
    full = load(source, n_search + n_heldout, seed, **kwargs)
    return full.take(0, n_search), full.take(n_search, n_search + n_heldout)
