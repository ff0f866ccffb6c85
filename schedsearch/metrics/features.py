"""Feature extractors for the FID proxy.

One small interface: ``name`` (stored in reference statistics, so scores are only ever compared in
one feature space), ``resize`` (how images reach the network), and
``__call__(images) -> np.ndarray (N, D) float64`` on float images in [0, 1] (N, C, H, W), or on
vectors for the Gaussian-mixture testbed. Work is done batch by batch so memory stays bounded.

* ``CleanFID`` — any network that takes clean-fid's input; ``inception()`` builds it on clean-fid's
  TorchScript Inception-V3, so our features are clean-fid's features (see docs/scoring.md).
* ``ClassifierFeatures`` — the penultimate features of the digits testbed's classifier.
* ``Identity`` — the vectors themselves (gmm testbed).
* ``ClipScore`` — a separate metric (CLIP score), never part of FID.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .. import files
from ..models.digits import load_classifier

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
# Where clean-fid itself downloads the file on Linux (it has no setting to move it).
CLEANFID_DEFAULT = os.path.join("/tmp", INCEPTION_FILE)
INCEPTION_ENV = "SCHEDSEARCH_INCEPTION"


def _as_batchable(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or an array, got {type(images).__name__}")
    if images.ndim < 2:
        raise ValueError(f"images must be batched, (N, ...); got shape {tuple(images.shape)}")
    return images


class Extractor:
    """Base class: splits the input into batches and concatenates float64 features."""

    name: str = "extractor"
    resize: str = "none"
    # what image folders are converted to: None or 3 RGB (as clean-fid), 1 grayscale, "stored"
    # grayscale files as one channel and the others as RGB (fid.read_image)
    channels: Optional[int | str] = None
    any_size: bool = False           # True: resizes every image itself, so a folder may mix sizes
    batch_size: int = 64

    def __call__(self, images) -> np.ndarray:
        images = _as_batchable(images)
        if images.shape[0] == 0:
            raise ValueError("no images to extract features from")
        out = [self._batch(images[i:i + self.batch_size])
               for i in range(0, images.shape[0], self.batch_size)]
        return np.concatenate(out).astype(np.float64, copy=False)

    def _batch(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def from_uint8(self, arrays: Sequence[np.ndarray], names: Optional[Sequence[str]] = None
                   ) -> np.ndarray:
        """Features of images read from files: (H, W, C) uint8 arrays, as clean-fid reads them
        (``names``: the files, for an error that says which one is odd)."""
        arrays = [np.asarray(a) for a in arrays]
        self.check_one_size(arrays, names)
        return self(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255))

    def check_one_size(self, arrays: Sequence[np.ndarray], names: Optional[Sequence[str]] = None
                       ) -> None:
        """Refuse a folder that mixes image sizes, naming two files of different sizes (an
        extractor that resizes every image, as Inception does, takes any)."""
        if self.any_size:
            return
        odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
        if odd is None:
            return

        a, b = arrays[0].shape, arrays[odd].shape
        if a[:2] == b[:2]:   # same size, other channel count: grayscale next to RGB
            def size(i):
                c = arrays[i].shape[2] if arrays[i].ndim == 3 else 1
                what = f"{c} channel{'s' if c != 1 else ''}"
                return f"{names[i]} ({what})" if names else what
            raise ValueError(f"the {self.name} extractor needs images of one kind; this folder "
                             f"mixes {size(0)} and {size(odd)}: save them all as grayscale or "
                             f"all as RGB")

        def size(i):
            h, w = arrays[i].shape[:2]
            return f"{names[i]} ({h}×{w})" if names else f"{h}×{w}"
        raise ValueError(f"the {self.name} extractor needs images of one size; this folder "
                         f"mixes {size(0)} and {size(odd)}: remove or resize the odd ones, "
                         f"or use --extractor inception, which resizes every image")

    def describe(self) -> dict:
        return {"extractor": self.name, "resize": self.resize}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Identity(Extractor):
    """The samples themselves as features (the Gaussian-mixture testbed's samples are vectors)."""

    name = "identity"
    resize = "none"
    # the pixels as the file holds them: a grayscale folder gives H·W features, as the samples of
    # a one-channel model do (read as RGB it gave 3·H·W, which no such model's samples match)
    channels = "stored"
    batch_size = 1 << 16

    def _batch(self, images):
        return images.detach().reshape(images.shape[0], -1).double().cpu().numpy()


def _uint8_hwc(images: torch.Tensor) -> np.ndarray:
    # The same rounding as sampler.to_uint8 and PNG saving, so features of in-memory samples equal
    # those of the same samples written to disk and read back.
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


class CleanFID(Extractor):
    """A network fed exactly as clean-fid feeds its own: uint8 image → clean-fid's "clean" resize
    (PIL bicubic per channel in float32, no re-quantisation) → (B, 3, S, S) float in [0, 255].

    Grayscale images are repeated to three channels, which is what PIL's ``convert('RGB')`` does
    when clean-fid reads a grayscale file.
    """

    resize = "clean"
    channels = 3
    any_size = True

    def __init__(self, net, name: str, device="cpu", batch_size: int = 32,
                 size: tuple[int, int] = (299, 299)):
        from cleanfid.resize import make_resizer  # cleanfid: imports torchvision, seconds

        self.net, self.name, self.batch_size = net, name, int(batch_size)
        self.device = torch.device(device)
        self.size = tuple(size)
        self.fn_resize = make_resizer("PIL", False, "bicubic", self.size)
        if self.size != (299, 299):
            self.resize = f"clean-{self.size[0]}x{self.size[1]}"

    def _batch(self, images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} takes (N, 1|3, H, W) images, got {tuple(images.shape)}")
        return self._features(list(_uint8_hwc(images)))

    def from_uint8(self, arrays, names=None):
        out = [self._features(list(arrays[i:i + self.batch_size]))
               for i in range(0, len(arrays), self.batch_size)]
        return np.concatenate(out).astype(np.float64, copy=False)

    @torch.no_grad()
    def _features(self, arrays: list) -> np.ndarray:
        resized = []
        for a in arrays:
            a = np.asarray(a)
            if a.ndim == 2:
                a = a[..., None]
            if a.shape[-1] == 1:
                a = np.repeat(a, 3, axis=-1)
            resized.append(self.fn_resize(a))
        # contiguous NCHW like clean-fid's ToTensor: a channels-last view makes conv kernels pick
        # other algorithms, which moves features in the last float bits
        batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous().to(self.device)
        return self.net(batch).detach().cpu().numpy().astype(np.float64)


# -- clean-fid's Inception ------------------------------------------------------------------------
def inception_missing_message(looked: Sequence[str]) -> str:
    return (
        f"clean-fid's Inception weights ({INCEPTION_FILE}, ~92 MB) were not found; looked at: "
        f"{', '.join(looked)}. schedsearch never downloads them itself. On a machine with "
        "internet run\n"
        f"    curl -L -o {INCEPTION_FILE} {INCEPTION_URL}\n"
        f"(or run clean-fid once there: it saves the file to {CLEANFID_DEFAULT}), copy the file "
        f"here, and either put it at {CLEANFID_DEFAULT}, set "
        f"{INCEPTION_ENV}=/path/to/{INCEPTION_FILE}, "
        "or pass --inception /path/to/the/file. For the built-in testbeds no download is needed: "
        "use --extractor digits or identity.")


def find_inception(path: Optional[str] = None) -> str:
    """The weights file: ``path`` (a file, or a folder holding it), else $SCHEDSEARCH_INCEPTION,
    else clean-fid's own download location. A location given explicitly that holds no file is an
    error rather than a reason to look elsewhere."""
    given = path or os.environ.get(INCEPTION_ENV)
    candidates = [given] if given else [CLEANFID_DEFAULT]
    looked = []
    for p in candidates:
        p = os.path.expanduser(p)
        f = os.path.join(p, INCEPTION_FILE) if os.path.isdir(p) else p
        looked.append(f)
        if os.path.isfile(f):
            return os.path.abspath(f)
    raise FileNotFoundError(inception_missing_message(looked))


def _inception_dir(weights: str) -> str:
    """InceptionV3W wants a folder holding a file of exactly that name; link other names into our
    cache so users may keep the file under any name."""
    if os.path.basename(weights) == INCEPTION_FILE:
        return os.path.dirname(weights)
    key = hashlib.sha256(os.path.abspath(weights).encode()).hexdigest()[:12]
    folder = str(files.cache_dir("inception", key))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:   # a cache that cannot be written: the link lives as long as the process
        folder = tempfile.mkdtemp(prefix="schedsearch-inception-")
        atexit.register(shutil.rmtree, folder, True)
    link = os.path.join(folder, INCEPTION_FILE)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(weights), link)
    return folder


def inception(path: Optional[str] = None, device="cpu", batch_size: int = 32) -> CleanFID:
    """clean-fid's Inception-V3 (2048-d pool features, "clean" resize) on a local weights file."""
    from cleanfid.inception_torchscript import InceptionV3W  # cleanfid: heavy

    weights = find_inception(path)
    try:
        with warnings.catch_warnings():   # torch 2.x deprecates torch.jit.load, clean-fid's loader
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load", category=FutureWarning)
            net = InceptionV3W(path=_inception_dir(weights), download=False, resize_inside=False)
    except RuntimeError as exc:
        raise ValueError(f"{weights} is not a readable clean-fid Inception TorchScript file "
                         f"({exc}); fetch it again from {INCEPTION_URL}") from None
    net = net.to(torch.device(device)).eval()
    return CleanFID(net, "inception-v3-cleanfid", device=device, batch_size=batch_size)


# -- the digits testbed's classifier --------------------------------------------------------------
class ClassifierFeatures(Extractor):
    """Penultimate features of a classifier exposing ``features(images01) -> (N, D)``."""

    resize = "none"

    def __init__(self, classifier, name: str, device="cpu", batch_size: int = 512,
                 channels: Optional[int] = 1):
        self.classifier, self.name = classifier, name
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.channels = channels

    @torch.no_grad()
    def _batch(self, images):
        feats = self.classifier.features(images.to(self.device, torch.float32))
        return feats.detach().double().cpu().numpy()


def digits(device="cpu", batch_size: int = 512) -> ClassifierFeatures:
    """The digits testbed's classifier; its name carries the weights' hash, so statistics made
    with retrained weights are refused."""

    clf = load_classifier(device=device)
    return ClassifierFeatures(clf, clf.fingerprint(), device=device, batch_size=batch_size)


# -- choosing one ---------------------------------------------------------------------------------
KINDS = ("inception", "digits", "identity")


def default_kind(model) -> str:
    # the flow testbeds share their ε twins' data, so their FID feature spaces too
    return {"gmm": "identity", "digits": "digits", "gmm-flow": "identity",
            "digits-flow": "digits"}.get(model.family, "inception")


def build(kind: Optional[str] = None, *, model=None, device=None,
          inception_path: Optional[str] = None, batch_size: Optional[int] = None) -> Extractor:
    """An extractor by kind; None picks the model's natural one (gmm and gmm-flow → identity,
    digits and digits-flow → the digits classifier, anything else → clean-fid Inception)."""
    if kind is None:
        if model is None:
            raise ValueError("name an extractor (inception, digits, identity) or pass a model")
        kind = default_kind(model)
    if device is None:
        device = model.device if model is not None else "cpu"
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if kind == "identity":
        return Identity()
    if kind == "digits":
        return digits(device=device, **kw)
    if kind == "inception":
        return inception(inception_path, device=device, **kw)
    raise ValueError(f"unknown extractor {kind!r}; choose from {', '.join(KINDS)}")


# -- CLIP score (a separate metric) ---------------------------------------------------------------
_SAVE_CLIP = ("on a machine with internet save one with  python -c \"from transformers import "
              "CLIPModel, CLIPProcessor as P; n='openai/clip-vit-base-patch32'; "
              "CLIPModel.from_pretrained(n).save_pretrained('clip'); "
              "P.from_pretrained(n).save_pretrained('clip')\"  and copy the folder here")


def check_clip_folder(path: str) -> None:
    """A CLIP folder that is missing, or holds no safetensors weights (the only kind read), is one
    line saying how to make one; checked before a study's model loads too."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP weights folder {path!r} does not exist; {_SAVE_CLIP}")
    names = ("model.safetensors", "model.safetensors.index.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise ValueError(f"CLIP folder {path!r} holds no model.safetensors (only safetensors "
                         f"weights are read; a pytorch_model.bin is never unpickled); {_SAVE_CLIP}")


class ClipScore:
    """CLIP score, 100·max(cos(image, text), 0) per image (the torchmetrics convention), from a
    local ``transformers`` CLIP folder (e.g. a saved ``openai/clip-vit-base-patch32``). Not part of
    FID."""

    name = "clip-score"

    def __init__(self, path: str, device="cpu", batch_size: int = 32):
        check_clip_folder(path)
        from transformers import CLIPModel, CLIPProcessor  # transformers: heavy, optional

        self.device, self.batch_size = torch.device(device), int(batch_size)
        try:   # safetensors only: a pytorch_model.bin beside them is never unpickled
            self.model = CLIPModel.from_pretrained(path, local_files_only=True,
                                                   use_safetensors=True).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"CLIP folder {path!r} could not be read ({exc}); {_SAVE_CLIP}") \
                from None
        self.path = path

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = _as_batchable(images)
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts "
                             f"for {images.shape[0]} images")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("CLIP score needs text prompts; class labels have no text")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            arrs = list(_uint8_hwc(images[i:i + self.batch_size]))
            arrs = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrs]
            inputs = self.processor(text=prompts[i:i + self.batch_size], images=arrs,
                                    return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs.get("attention_mask"))
            img, txt = _embeds(img), _embeds(txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out.append((100 * cos.clamp(min=0)).double().cpu().numpy())
        return np.concatenate(out)


def _embeds(out):
    # transformers 5 may return a model output object rather than a bare tensor
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")
