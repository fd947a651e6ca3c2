"""The optimizer (timm's factory) and the per-step learning-rate schedule of a run (`optim.*`)."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

# optim.name -> timm's optimizer name ("momentum": SGD without Nesterov; timm's "sgd" is Nesterov)
TIMM_NAMES = {"adamw": "adamw", "sgd": "momentum"}


def make_optimizer(module: nn.Module, optim: Any) -> torch.optim.Optimizer:
    """timm's optimizer over the trainable parameters of `module`, with weight decay on the
    matrices only (timm's `param_groups_weight_decay` excludes biases and norms).

    Always two groups, decay then no decay, even when one is empty or optim.weight_decay is 0:
    the layout of checkpoints saved before timm built the optimizer (an optimizer's state is
    matched to its parameters by position)."""
    split: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for group in param_groups_weight_decay(module, weight_decay=1.0):  # 1.0 marks the decay group
        split[group["weight_decay"] > 0] += group["params"]
    groups = [
        {"params": split[True], "weight_decay": optim.weight_decay},
        {"params": split[False], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"betas": tuple(optim.betas)} if optim.name == "adamw" else {}
    return create_optimizer_v2(
        groups,
        opt=TIMM_NAMES[optim.name],
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        momentum=optim.momentum,
        **kwargs,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `optim.warmup_fraction` of the steps, then cosine decay to
    `optim.min_lr_ratio` of the rate, or flat (`optim.scheduler=constant`); stepped every step.

    A torch `LambdaLR` (transformers' schedule functions), not timm's `create_scheduler_v2`:
    timm's step-based warmup + cosine gives the same curve only to about 1e-15 relative (it
    computes `min + (lr - min) * ...` where this computes `lr * factor`; 14 of 57 steps differ
    in the last bits for a 57-step run), so runs would no longer repeat bit for bit; it has no
    warmup-then-constant schedule; it is stepped by `step_update`, outside Lightning's scheduler
    protocol; and its state is not the LambdaLR state that checkpoints already hold."""
    total = max(int(total_steps), 1)
    warmup = int(total * optim.warmup_fraction)
    if optim.scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=optim.min_lr_ratio
        )
    return get_constant_schedule_with_warmup(optimizer, warmup)
