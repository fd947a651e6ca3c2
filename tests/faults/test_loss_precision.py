"""Issue 14 finding 14: loss terms upcast lower precisions to float32 but keep float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkd.losses import attention_loss, attention_map, dkd_loss, similarity_loss


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def dkd_ref(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, a: float, b: float, t: float) -> float:
    """Zhao et al.'s DKD (mdistiller), in float64 numpy."""
    gt = np.eye(zs.shape[1])[y]
    ps, pt = softmax(zs / t), softmax(zt / t)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() / len(zs) * t * t
    ns, nt = softmax(zs / t - 1000.0 * gt), softmax(zt / t - 1000.0 * gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        nckd = (nt * (np.log(nt) - np.log(ns)))[gt == 0].sum() / len(zs) * t * t
    return a * tckd + b * nckd


def attention_ref(s: np.ndarray, t: np.ndarray) -> float:
    def amap(x: np.ndarray) -> np.ndarray:
        e = (x**2).mean(axis=1).reshape(len(x), -1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    return float(((amap(s) - amap(t)) ** 2).mean())


def similarity_ref(s: np.ndarray, t: np.ndarray) -> float:
    def gram(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        g = flat @ flat.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((gram(s) - gram(t)) ** 2).sum() / len(s) ** 2)


def test_dkd_keeps_float64() -> None:
    zs, zt = randn(8, 10, seed=1) * 3, randn(8, 10, seed=2) * 3
    y = torch.arange(8) % 10
    got = dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0)
    assert got.dtype == torch.float64
    ref = dkd_ref(zs.numpy(), zt.numpy(), y.numpy(), 1.0, 8.0, 4.0)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_attention_and_similarity_keep_float64() -> None:
    s, t = randn(4, 3, 5, 5, seed=3), randn(4, 6, 5, 5, seed=4)
    got = attention_loss(s, attention_map(t))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(attention_ref(s.numpy(), t.numpy()), rel=1e-12)
    got = similarity_loss(s, t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(similarity_ref(s.numpy(), t.numpy()), rel=1e-12)


def test_half_precisions_are_upcast_to_float32() -> None:
    zs, zt = randn(4, 5, seed=5).half(), randn(4, 5, seed=6).bfloat16()
    y = torch.tensor([0, 1, 2, 3])
    assert dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).dtype == torch.float32
    s = randn(2, 3, 4, 4, seed=7).half()
    assert attention_map(s).dtype == torch.float32
    assert similarity_loss(s, s.bfloat16()).dtype == torch.float32
