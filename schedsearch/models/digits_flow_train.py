"""Train the ``digits-flow`` testbed: the digits UNet by flow matching (rectified flow).

    python -m schedsearch.models.digits_flow_train [--seed 0] [--steps 4000] [--out DIR]

x_t = (1−t)·x0 + t·ε with t uniform in [0, 1), the UNet fed 1000·t and trained on the MSE to
v = ε − x0 (Lipman et al. 2023; Liu et al. 2023), 12% of the labels replaced by the null class so
the same network is the unconditional model of CFG. Everything else is the digits testbed's
recipe (``digits_train``): data split, optimiser, schedule, EMA, one thread by default.

Writes ``digits_flow_unet.safetensors`` (EMA weights) and ``digits_flow.json`` (architecture,
settings, split, wall time, hash) into ``--out`` (default: the package's shipped weights).
Fully seeded: on the same machine, thread count and library versions a rerun gives the same
weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..noise import FLOW
from . import digits as D
from . import digits_flow as F
from .digits_train import _EMA, _batches, _finish, _lr_factor, _prepare, _run_flags, _save


@dataclass(frozen=True)
class FlowTraining:
    steps: int = 4000
    batch_size: int = 64          # half the digits UNet's 128: keeps a run on a shared 2-core CPU
                                  # under half an hour (docs/digits.md)
    lr: float = 2e-3
    warmup: int = 250
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    class_dropout: float = 0.12
    grad_clip: float = 1.0


def _flow_pair(x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_t, 1000·t, v target) for a batch: t uniform in [0, 1), v = ε − x0."""
    t = torch.rand(len(x0), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps, t * FLOW.num_train_timesteps, eps - x0


def _step(unet, labels, opt, params, batch, settings: FlowTraining) -> float:
    x_t, steps, target, c = batch
    pred = unet(x_t, steps, encoder_hidden_states=labels(c).unsqueeze(1)).sample
    loss = nn.functional.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, settings.grad_clip)
    opt.step()
    return loss.item()


def train(settings: FlowTraining, seed: int, device: torch.device) -> tuple[dict, dict]:
    """Returns (EMA tensors keyed ``unet.*`` / ``labels.*``, a record of the run)."""
    torch.manual_seed(seed)
    unet = D.build_unet(D.UNET_CONFIG).to(device).train()
    labels = D.build_label_embedding(unet.config.cross_attention_dim).to(device).train()
    params = list(unet.parameters()) + list(labels.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = _EMA(params, settings.ema_decay)
    images, classes = D.digits_data("train")
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(_batches(len(images), settings.batch_size, settings.steps, g),
               total=settings.steps, desc="digits-flow unet", unit="step", dynamic_ncols=True)
    for step, rows in enumerate(bar):
        x_t, steps, target = _flow_pair(images[rows], g)
        drop = torch.rand(len(rows), generator=g) < settings.class_dropout
        c = torch.where(drop, torch.full_like(classes[rows], D.NULL_CLASS), classes[rows])
        for group in opt.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, settings.warmup, settings.steps)
        batch = tuple(a.to(device) for a in (x_t, steps, target, c))
        losses.append(_step(unet, labels, opt, params, batch, settings))
        ema.update()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    bar.close()
    return _finish(unet, labels, ema, losses, time.perf_counter() - t0, settings, seed, device)


def write(out: Path, tensors: dict, record: dict) -> None:
    digest = _save(out, F.UNET_FILE, tensors)
    train, heldout = D.split_indices()
    config = {
        "format": 1,
        "split": {"seed": D.SPLIT_SEED, "heldout_fraction": D.HELDOUT_FRACTION,
                  "stratified": True, "train": len(train), "heldout": len(heldout),
                  "fingerprint": D.split_fingerprint()},
        "unet": {"file": F.UNET_FILE, "sha256": digest, "stored_dtype": "float32",
                 "architecture": D.UNET_CONFIG,
                 "label_embedding": {"num_embeddings": D.NUM_CLASSES + 1,
                                     "null_class": D.NULL_CLASS},
                 "noise_table": FLOW.fingerprint(),
                 "objective": "flow matching: MSE to v = eps - x0 at x_t = (1-t) x0 + t eps, "
                              "t uniform in [0, 1), timestep 1000 t",
                 "weights": "EMA", "training": record},
    }
    with open(out / F.CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m schedsearch.models.digits_flow_train",
                                description="Train the digits-flow testbed's UNet.")
    # this script trains the flow UNet only, so --device covers all of its training
    _run_flags(p, weights="the weight file and digits_flow.json", steps=FlowTraining.steps,
               batch_size=FlowTraining.batch_size,
               device_help="training device (default cpu)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _prepare(args)
    settings = FlowTraining(steps=args.steps, batch_size=args.batch_size)
    tensors, record = train(settings, args.seed, torch.device(args.device))
    write(args.out, tensors, record)
    print(f"digits-flow unet: final loss {record['final_loss']:.4f}, "
          f"{record['wall_seconds']:.1f} s ({torch.get_num_threads()} threads); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
