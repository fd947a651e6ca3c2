"""Per-sample CPU latency (batch 1) and parameter counts, measured with torch.utils.benchmark."""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from mmkd.adapters import Adapter
from mmkd.adapters.base import Batch


def cpu_latency_ms(model: Adapter, batch: Batch, min_run_time: float = 1.0) -> float:
    """Median milliseconds of one forward pass on `batch` (one sample), on the CPU, eval mode.

    Moves `model` to the CPU and leaves it in eval mode."""
    model.cpu().eval()
    batch = {k: v[:1].cpu() for k, v in batch.items()}
    with torch.inference_mode():
        model(batch)  # warm-up outside the timer (lazy init, allocator)
        timer = Timer(
            stmt="model(batch)",
            globals={"model": model, "batch": batch},
            num_threads=torch.get_num_threads(),
        )
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return measurement.median * 1000.0


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters of `model`, trainable or not."""
    return sum(p.numel() for p in model.parameters())
