"""FreeU as a per-step plan over a diffusers ``UNet2DConditionModel`` (see docs/freeu.md).

A plan says, for each solver step, whether FreeU is on and with which (b1, b2, s1, s2). Two
variants act on the UNet:

* ``diffusers`` — ``unet.enable_freeu``: the first two up-blocks (index 0 → b1/s1, 1 → b2/s2).
* ``original`` — the FreeU authors' patch, which the paper's code used: keyed on the channel count of
  the backbone features entering each up-block resnet (1280 → b1/s1 on channels [:640], 640 → b2/s2 on
  [:320] for SD), so it reaches more resnets. For other widths the two widest distinct channel counts
  of the UNet play the roles of 1280 and 640.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

VARIANTS = ("diffusers", "original")
_STATE = "_schedsearch_freeu"  # attribute on the UNet holding the original variant's live setting


@dataclass(frozen=True)
class FreeU:
    """One FreeU setting. Every value must be > 0 (diffusers treats 0.0 as "off")."""

    b1: float
    b2: float
    s1: float
    s2: float

    def __post_init__(self) -> None:
        for name in ("b1", "b2", "s1", "s2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"FreeU {name} must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, float(v))

    def as_dict(self) -> dict:
        return {"b1": self.b1, "b2": self.b2, "s1": self.s1, "s2": self.s2}


# Published defaults of the FreeU authors, and the paper's 512² setting.
DEFAULTS = {
    "sd14": FreeU(1.3, 1.4, 0.9, 0.2),
    "sd15": FreeU(1.5, 1.6, 0.9, 0.2),
    "sd21": FreeU(1.4, 1.6, 0.9, 0.2),
    "sdxl": FreeU(1.3, 1.4, 0.9, 0.2),
    "paper": FreeU(1.1, 1.1, 0.9, 0.2),
}


@dataclass(frozen=True)
class FreeUPlan:
    """Per-step FreeU settings; ``None`` means off for that step."""

    steps: tuple[Optional[FreeU], ...]
    variant: str = "diffusers"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"FreeU variant must be one of {VARIANTS}, got {self.variant!r}")
        steps = tuple(self.steps)
        for i, s in enumerate(steps):
            if s is not None and not isinstance(s, FreeU):
                raise ValueError(f"FreeU plan step {i} must be a FreeU setting or None, got {s!r}")
        object.__setattr__(self, "steps", steps)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def off(cls, steps: int) -> "FreeUPlan":
        return cls((None,) * int(steps))

    @classmethod
    def from_start(cls, steps: int, t_aug: int, setting: FreeU, variant: str = "diffusers"
                   ) -> "FreeUPlan":
        """On for every step with 0-based index >= t_aug (t_aug >= steps: never on)."""
        if isinstance(t_aug, bool) or not isinstance(t_aug, int) or t_aug < 0:
            raise ValueError(f"t_aug must be an integer >= 0, got {t_aug!r}")
        return cls(tuple(setting if i >= t_aug else None for i in range(int(steps))), variant)

    @classmethod
    def per_step(cls, settings: Iterable[Optional[FreeU]], variant: str = "diffusers"
                 ) -> "FreeUPlan":
        return cls(tuple(settings), variant)

    # -- use -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return any(s is not None for s in self.steps)

    def at(self, i: int) -> Optional[FreeU]:
        """The setting for step i; steps past the plan (Heun's last correction) repeat the last."""
        if not self.steps:
            return None
        return self.steps[min(i, len(self.steps) - 1)]

    def to_json(self) -> dict:
        return {"variant": self.variant,
                "steps": [None if s is None else s.as_dict() for s in self.steps]}

    @classmethod
    def from_json(cls, data: dict) -> "FreeUPlan":
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError("a FreeU plan must be an object with a 'steps' list")
        steps = []
        for i, s in enumerate(data["steps"]):
            if s is None:
                steps.append(None)
            elif isinstance(s, dict) and set(s) == {"b1", "b2", "s1", "s2"}:
                steps.append(FreeU(**s))
            else:
                raise ValueError(f"FreeU plan step {i} must be null or an object with exactly "
                                 f"b1, b2, s1, s2; got {s!r}")
        return cls(tuple(steps), data.get("variant", "diffusers"))

    def describe(self) -> str:
        if not self.active:
            return "off"
        on = [i for i, s in enumerate(self.steps) if s is not None]
        values = sorted({tuple(s.as_dict().values()) for s in self.steps if s is not None})
        return f"{self.variant} on steps {on} with (b1, b2, s1, s2) in {values}"

    def hook(self, unet):
        """Apply step 0 now; return a solver hook that sets the setting of step i+1 after step i's
        model call, so every model call runs with the setting of the σ it is evaluated at."""
        set_freeu(unet, self.at(0), self.variant)

        def hook(i, sigma, sigma_next, x, denoised):
            set_freeu(unet, self.at(i + 1), self.variant)
        return hook


def set_freeu(unet, setting: Optional[FreeU], variant: str = "diffusers") -> None:
    """Switch FreeU on the UNet to ``setting`` (None: off) with the given variant."""
    if variant not in VARIANTS:
        raise ValueError(f"FreeU variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "diffusers" and setting is not None:
        unet.enable_freeu(**setting.as_dict())
    else:
        unet.disable_freeu()
    if variant == "original" and setting is not None:
        _install_original(unet)
    if hasattr(unet, _STATE):
        setattr(unet, _STATE, setting if variant == "original" else None)


def clear(unet) -> None:
    set_freeu(unet, None)


_UP_BLOCK_KEYS = ("s1", "s2", "b1", "b2")   # what enable_freeu sets on each up-block
_ABSENT = object()


def snapshot(unet) -> tuple:
    """The UNet's FreeU state (both variants), for ``restore``: a caller that switches FreeU per
    step can leave the UNet as it found it, a user's own ``enable_freeu`` included."""
    blocks = [{k: getattr(b, k, None) for k in _UP_BLOCK_KEYS} for b in unet.up_blocks]
    return blocks, getattr(unet, _STATE, _ABSENT)


def restore(unet, state: tuple) -> None:
    blocks, original = state
    for block, values in zip(unet.up_blocks, blocks):
        for k, v in values.items():
            if v is not None or hasattr(block, k):
                setattr(block, k, v)
    if original is not _ABSENT:
        setattr(unet, _STATE, original)
    elif hasattr(unet, _STATE):
        # the channel-keyed hooks, once installed, stay registered; with no setting they are inert
        setattr(unet, _STATE, None)


def _widths(unet) -> tuple[int, Optional[int]]:
    distinct = sorted(set(unet.config.block_out_channels), reverse=True)
    return distinct[0], (distinct[1] if len(distinct) > 1 else None)


def _install_original(unet) -> None:
    """Register (once) the hooks of the channel-keyed variant; they read the live setting from
    the UNet on every call, so switching between steps costs an attribute write."""
    if hasattr(unet, _STATE):
        return
    from diffusers.utils.torch_utils import fourier_filter

    setattr(unet, _STATE, None)
    wide, narrow = _widths(unet)

    def record_input_width(block, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        block._schedsearch_in_channels = h.shape[1]

    def make_resnet_hook(block, j):
        def pre(resnet, args):
            setting = getattr(unet, _STATE)
            if setting is None:
                return None
            c_h = block._schedsearch_in_channels if j == 0 else block.resnets[j - 1].out_channels
            if c_h == wide:
                b, s = setting.b1, setting.s1
            elif c_h == narrow:
                b, s = setting.b2, setting.s2
            else:
                return None
            x = args[0]
            h, r = x[:, :c_h], x[:, c_h:]
            h = torch.cat([h[:, : c_h // 2] * b, h[:, c_h // 2:]], dim=1)
            r = fourier_filter(r, threshold=1, scale=s)
            return (torch.cat([h, r], dim=1),) + tuple(args[1:])
        return pre

    for block in unet.up_blocks:
        block.register_forward_pre_hook(record_input_width, with_kwargs=True)
        for j, resnet in enumerate(block.resnets):
            resnet.register_forward_pre_hook(make_resnet_hook(block, j))
