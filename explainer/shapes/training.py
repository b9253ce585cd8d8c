"""What the training stages share: the log line, the learning-rate schedule, atomic checkpoints
(every ``CHECKPOINT_SECONDS``) and the seed of each cached scene."""

from __future__ import annotations

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
