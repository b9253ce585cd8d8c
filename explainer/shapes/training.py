"""What the training stages share: the log line, the learning-rate schedule, atomic checkpoints
(every ``CHECKPOINT_SECONDS``), the seed of each cached scene and the command-line options both
embedded models' trainings take."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

CHECKPOINT_SECONDS = 180


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def warmup_cosine(warmup: int, total: int, floor: float = 0.05):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place."""
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def scene_seed(args, index: int) -> int:
    return args.seed * 1_000_003 + index


def shared_arguments(parser: argparse.ArgumentParser, work: str, out: str) -> None:
    """The options both trainings take, with the same defaults: folders, seed and threads, resuming,
    the scene cache, the main phase's optimiser and EMA, caption dropout, and the shape phase."""
    parser.add_argument("--work", default=work, help="scratch dir for caches and checkpoints")
    parser.add_argument("--out", default=out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--shape-steps", type=int, default=1500)
    parser.add_argument("--shape-lr", type=float, default=2e-4)
    parser.add_argument("--shape-outline-weight", type=float, default=8.0)
    parser.add_argument("--shape-ema", type=float, default=0.995)
