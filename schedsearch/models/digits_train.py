"""Train the ``digits`` testbed: the class-conditional UNet and the digit classifier.

    python -m schedsearch.models.digits_train [--what unet|classifier|all] [--seed 0] [--out DIR]

Writes ``digits_unet.safetensors`` (EMA weights), ``digits_classifier.safetensors`` and
``digits.json`` (architecture, training settings, split, wall time, file hashes) into ``--out``
(default: the package's shipped weights). Fully seeded: on the same machine, thread count and
library versions, a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..noise import SD
from . import digits as D


@dataclass(frozen=True)
class UNetTraining:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 250
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    class_dropout: float = 0.12   # labels replaced by the null class, so CFG has an uncond model
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ClassifierTraining:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-3
    noise_std: float = 0.05       # pixel noise on [0, 1] inputs: samples are never exactly 0..16/16
    max_shift: int = 1            # random translations by up to this many pixels ...
    shift_prob: float = 0.3       # ... of this share of the images: the digits are centred, and
                                  # shifting every image costs held-out accuracy
    label_smoothing: float = 0.1  # bounded logits keep over-confidence out of the FID features


# -- shared pieces ----------------------------------------------------------------------------------
def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batches(n: int, batch_size: int, steps: int, g: torch.Generator):
    """Indices for ``steps`` batches, walking seeded permutations of the data epoch by epoch."""
    order, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def _versions(device: torch.device) -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


# -- the UNet ---------------------------------------------------------------------------------------
class _EMA:
    """Exponential moving average of parameters, with the usual (1+n)/(10+n) warm-up of the decay."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _finish(unet, labels, ema, losses: list, seconds: float, settings, seed: int,
            device: torch.device) -> tuple[dict, dict]:
    """The EMA weights as tensors keyed ``unet.*`` / ``labels.*`` and a record of the run."""
    ema.copy_to()
    tensors = {f"unet.{k}": v.detach().float().cpu().contiguous()
               for k, v in unet.state_dict().items()}
    tensors.update({f"labels.{k}": v.detach().float().cpu().contiguous()
                    for k, v in labels.state_dict().items()})
    record = {"settings": asdict(settings), "seed": seed, "wall_seconds": round(seconds, 1),
              "final_loss": round(sum(losses[-500:]) / len(losses[-500:]), 5),
              **_versions(device)}
    return tensors, record


def _noisy(x0: torch.Tensor, t: torch.Tensor, g: torch.Generator, alphas: torch.Tensor):
    """DDPM forward process x_t = sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε; returns (x_t, ε)."""
    eps = torch.randn(x0.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


def train_unet(settings: UNetTraining, seed: int, device: torch.device) -> tuple[dict, dict]:
    """Returns (EMA tensors keyed ``unet.*`` / ``labels.*``, a record of the run)."""
    torch.manual_seed(seed)
    unet = D.build_unet(D.UNET_CONFIG)
    labels = D.build_label_embedding(unet.config.cross_attention_dim)
    unet.to(device).train()
    labels.to(device).train()
    params = list(unet.parameters()) + list(labels.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = _EMA(params, settings.ema_decay)
    images, classes = D.digits_data("train")
    alphas = torch.from_numpy(SD.alphas_cumprod).float()
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(_batches(len(images), settings.batch_size, settings.steps, g),
               total=settings.steps, desc="digits unet", unit="step", dynamic_ncols=True)
    for step, rows in enumerate(bar):
        t = torch.randint(0, SD.num_timesteps, (len(rows),), generator=g)
        x_t, eps = _noisy(images[rows], t, g, alphas)
        drop = torch.rand(len(rows), generator=g) < settings.class_dropout
        c = torch.where(drop, torch.full_like(classes[rows], D.NULL_CLASS), classes[rows])
        for group in opt.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, settings.warmup, settings.steps)
        pred = unet(x_t.to(device), t.to(device),
                    encoder_hidden_states=labels(c.to(device)).unsqueeze(1)).sample
        loss = nn.functional.mse_loss(pred, eps.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        ema.update()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    bar.close()
    return _finish(unet, labels, ema, losses, time.perf_counter() - t0, settings, seed, device)


# -- the classifier ---------------------------------------------------------------------------------
def _augment(x01: torch.Tensor, settings: ClassifierTraining, g: torch.Generator) -> torch.Tensor:
    """Random ±max_shift translations of some images (background fills in), then clipped
    Gaussian pixel noise."""
    s = settings.max_shift
    padded = nn.functional.pad(x01, (s, s, s, s))
    moved = torch.rand(len(x01), generator=g) < settings.shift_prob
    dx = torch.where(moved, torch.randint(0, 2 * s + 1, (len(x01),), generator=g), s)
    dy = torch.where(moved, torch.randint(0, 2 * s + 1, (len(x01),), generator=g), s)
    shifted = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
                           for i in range(len(x01))])
    noise = torch.randn(shifted.shape, generator=g) * settings.noise_std
    return (shifted + noise).clamp(0, 1)


@torch.no_grad()
def heldout_accuracy(net: nn.Module) -> float:
    net.eval()
    images, labels = D.digits_data("heldout")
    return float((net(D.to_unit(images)).argmax(1) == labels).float().mean())


def train_classifier(settings: ClassifierTraining, seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    net = D.DigitsCNN(**D.CLASSIFIER_CONFIG)
    images, labels = D.digits_data("train")
    x01 = D.to_unit(images)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(x01) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    bar = tqdm(_batches(len(x01), settings.batch_size, total, g), total=total,
               desc="digits classifier", unit="step", dynamic_ncols=True)
    for step, rows in enumerate(bar):
        net.train()
        for group in opt.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, steps_per_epoch, total)
        loss = nn.functional.cross_entropy(net(_augment(x01[rows], settings, g)), labels[rows],
                                           label_smoothing=settings.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    bar.close()
    seconds = time.perf_counter() - t0
    accuracy = heldout_accuracy(net)
    tensors = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    record = {"settings": asdict(settings), "seed": seed, "wall_seconds": round(seconds, 1),
              "heldout_accuracy": round(accuracy, 5), **_versions(torch.device("cpu"))}
    return tensors, record


# -- writing ----------------------------------------------------------------------------------------
def _existing_config(out: Path) -> dict:
    try:
        return D.read_config(out)
    except D.WeightsError:
        return {}


def _save(out: Path, filename: str, tensors: dict) -> str:
    from safetensors.torch import save_file

    path = out / filename
    save_file(tensors, str(path))
    return D._file_sha256(path)


def write_unet(out: Path, tensors: dict, record: dict) -> None:
    digest = _save(out, D.UNET_FILE, tensors)
    _update_config(out, "unet", {
        "file": D.UNET_FILE, "sha256": digest, "stored_dtype": "float32",
        "architecture": D.UNET_CONFIG,
        "label_embedding": {"num_embeddings": D.NUM_CLASSES + 1, "null_class": D.NULL_CLASS},
        "noise_table": SD.fingerprint(), "objective": "epsilon MSE, t uniform in 0..999",
        "weights": "EMA", "training": record})


def write_classifier(out: Path, tensors: dict, record: dict) -> None:
    digest = _save(out, D.CLASSIFIER_FILE, tensors)
    _update_config(out, "classifier", {
        "file": D.CLASSIFIER_FILE, "sha256": digest, "architecture": D.CLASSIFIER_CONFIG,
        "input": "(N, 1, 8, 8) in [0, 1]", "training": record})


def _update_config(out: Path, section: str, entry: dict) -> None:
    config = _existing_config(out)
    train, heldout = D.split_indices()
    config["format"] = 1
    config["split"] = {"seed": D.SPLIT_SEED, "heldout_fraction": D.HELDOUT_FRACTION,
                       "stratified": True, "train": len(train), "heldout": len(heldout),
                       "fingerprint": D.split_fingerprint()}
    config[section] = entry
    with open(out / D.CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


# -- command line -----------------------------------------------------------------------------------
def _run_flags(p: argparse.ArgumentParser, *, weights: str, steps: int, batch_size: int,
               device_help: str) -> None:
    """The flags every digits training script takes (this one and digits_flow_train); what
    --device covers differs (only this script also trains a classifier), so each says its own."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=D.WEIGHTS_DIR,
                   help=f"folder for {weights} (default: the shipped weights)")
    p.add_argument("--steps", type=int, default=steps, help="UNet training steps")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the seeded run then does not depend on the "
                   "machine's core count, and one thread is the fastest on a CPU shared with other "
                   "work)")


def _prepare(args: argparse.Namespace) -> None:
    """Threads set and the output folder made, before any training."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m schedsearch.models.digits_train",
                                description="Train the digits testbed (UNet and/or classifier).")
    p.add_argument("--what", choices=("unet", "classifier", "all"), default="all")
    _run_flags(p, weights="the weight files and digits.json", steps=UNetTraining.steps,
               batch_size=UNetTraining.batch_size,
               device_help="UNet training device (default cpu; the classifier always trains on "
                           "the CPU)")
    p.add_argument("--epochs", type=int, default=ClassifierTraining.epochs,
                   help="classifier training epochs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _prepare(args)
    start = time.perf_counter()
    if args.what in ("classifier", "all"):
        tensors, record = train_classifier(ClassifierTraining(epochs=args.epochs), args.seed)
        write_classifier(args.out, tensors, record)
        print(f"classifier: held-out accuracy {record['heldout_accuracy']:.4f}, "
              f"{record['wall_seconds']:.1f} s")
    if args.what in ("unet", "all"):
        settings = UNetTraining(steps=args.steps, batch_size=args.batch_size)
        tensors, record = train_unet(settings, args.seed, torch.device(args.device))
        write_unet(args.out, tensors, record)
        print(f"unet: final loss {record['final_loss']:.4f}, {record['wall_seconds']:.1f} s")
    print(f"wrote {args.out}; wall time {time.perf_counter() - start:.1f} s "
          f"({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
