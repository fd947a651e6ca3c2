"""Each loss term against a reference written from its formula (plain Python / numpy, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mmkd.config.schema import LossesCfg
from mmkd.losses import (
    DistillLoss,
    contrastive_loss,
    embed_loss,
    kd_loss,
    rkd_angle,
    rkd_distance,
)

TERMS = ("kd", "logit_mse", "embed", "contrastive", "relational", "ce")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(randn(*shape, seed=seed), dim=-1)


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# --------------------------------------------------------------------------- references


def softmax_ref(z: np.ndarray) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl_ref(zs: np.ndarray, zt: np.ndarray, t: float) -> float:
    """(1/B) Σ_b Σ_c p_t log(p_t / p_s), p = softmax(z / T), without the T² factor."""
    total = 0.0
    for b in range(zs.shape[0]):
        ps, pt = softmax_ref(zs[b] / t), softmax_ref(zt[b] / t)
        total += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(zs.shape[1]))
    return total / zs.shape[0]


def logsumexp_ref(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def nce_rows_ref(queries: np.ndarray, keys: np.ndarray, scale: float, offset: int) -> float:
    """Mean over local query rows i of the cross-entropy of row i of scale·Q Kᵀ, label offset+i."""
    total = 0.0
    for i in range(queries.shape[0]):
        row = [scale * float(np.dot(queries[i], keys[j])) for j in range(keys.shape[0])]
        total += logsumexp_ref(row) - row[offset + i]
    return total / queries.shape[0]


def huber_ref(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of 0.5 d² (|d| < 1) or |d| - 0.5 (beta = 1)."""
    d = (a - b).ravel()
    return float(np.mean([0.5 * v * v if abs(v) < 1 else abs(v) - 0.5 for v in d]))


def distances_ref(x: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances divided by the mean of the positive off-diagonal ones."""
    n = x.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = math.sqrt(sum((x[i, f] - x[j, f]) ** 2 for f in range(x.shape[1])))
    positive = [d[i, j] for i in range(n) for j in range(n) if i != j and d[i, j] > 0]
    return d / np.mean(positive)


def angles_ref(x: np.ndarray) -> np.ndarray:
    """A[i, j, k] = cos of the angle at x_j between x_i - x_j and x_k - x_j (0 if degenerate)."""
    n = x.shape[0]
    a = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i == j or k == j:
                    continue
                u, v = x[i] - x[j], x[k] - x[j]
                a[i, j, k] = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return a


def ce_ref(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
    total = 0.0
    for b in range(logits.shape[0]):
        lse = logsumexp_ref(list(logits[b]))
        nll = [lse - v for v in logits[b]]
        total += (1 - smoothing) * nll[labels[b]] + smoothing * float(np.mean(nll))
    return total / logits.shape[0]


# --------------------------------------------------------------------------- kd


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_formula(temperature: float) -> None:
    zs, zt = randn(5, 7, seed=1) * 3, randn(5, 7, seed=2) * 3
    expected = temperature**2 * kl_ref(np64(zs), np64(zt), temperature)
    assert kd_loss(zs, zt, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    z = randn(4, 6, seed=3) * 5
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # a constant shift per row does not change the distribution either
    assert kd_loss(z + 3.0, z, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert kd_loss(z, randn(4, 6, seed=4), 4.0).item() > 1e-3


def test_kd_loss_t_squared_scaling() -> None:
    """T² keeps the loss O(1) as T grows: T²·KL -> (1/2C) Σ_c (δ_c - mean δ)², δ = z_s - z_t."""
    zs, zt = randn(6, 5, seed=5), randn(6, 5, seed=6)
    delta = np64(zs - zt)
    centred = delta - delta.mean(axis=1, keepdims=True)
    limit = float((centred**2).sum(axis=1).mean() / (2 * delta.shape[1]))
    value = kd_loss(zs, zt, 200.0).item()
    assert value == pytest.approx(limit, rel=0.02)
    # and at a moderate T the factor is exactly T² times the unscaled KL
    for t in (3.0, 8.0):
        assert kd_loss(zs, zt, t).item() / t**2 == pytest.approx(
            kl_ref(np64(zs), np64(zt), t), rel=1e-4
        )


# --------------------------------------------------------------------------- embed


def test_embed_loss_cosine_matches_formula() -> None:
    s, t = randn(6, 8, seed=7), randn(6, 8, seed=8)
    s_, t_ = np64(s), np64(t)
    cos = [np.dot(s_[b], t_[b]) / (np.linalg.norm(s_[b]) * np.linalg.norm(t_[b])) for b in range(6)]
    expected = float(np.mean([1 - c for c in cos]))
    assert embed_loss(s, t, "cosine").item() == pytest.approx(expected, rel=1e-5)
    assert embed_loss(s, 2.5 * s, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_embed_loss_mse_matches_formula() -> None:
    s, t = randn(6, 8, seed=9), randn(6, 8, seed=10)
    s_, t_ = np64(s), np64(t)
    expected = sum((s_[b, d] - t_[b, d]) ** 2 for b in range(6) for d in range(8)) / 48
    assert embed_loss(s, t, "mse").item() == pytest.approx(expected, rel=1e-5)
    assert embed_loss(s, s.clone(), "mse").item() == 0.0


# --------------------------------------------------------------------------- contrastive


def test_contrastive_loss_matches_symmetric_infonce() -> None:
    s, t = unit(5, 8, seed=11), unit(5, 8, seed=12)
    scale = 7.5
    s_, t_ = np64(s), np64(t)
    expected = (nce_rows_ref(s_, t_, scale, 0) + nce_rows_ref(t_, s_, scale, 0)) / 2
    got = contrastive_loss(s, t, torch.tensor(scale))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_is_low_for_matching_pairs() -> None:
    s = unit(8, 16, seed=13)
    matched = contrastive_loss(s, s.clone(), torch.tensor(20.0)).item()
    shuffled = contrastive_loss(s, s.roll(1, dims=0), torch.tensor(20.0)).item()
    assert matched < 0.1 < shuffled


@pytest.mark.parametrize("offset", [0, 2, 3])
def test_contrastive_loss_with_gather_uses_global_negatives(offset: int) -> None:
    """Local rows against the gathered columns, labels offset by this process's position."""
    local, extra, dim, scale = 3, 3, 8, 5.0
    s, t = unit(local, dim, seed=14), unit(local, dim, seed=15)
    remote_s, remote_t = unit(extra, dim, seed=16), unit(extra, dim, seed=17)
    all_s = torch.cat([remote_s[:offset], s, remote_s[offset:]])
    all_t = torch.cat([remote_t[:offset], t, remote_t[offset:]])
    calls: list[int] = []

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        calls.append(1)
        if x is s:
            return all_s, offset
        assert x is t
        return all_t, offset

    got = contrastive_loss(s, t, torch.tensor(scale), gather).item()
    assert len(calls) == 2
    # reference on the global matrix, restricted to this process's rows
    gs, gt = np64(all_s), np64(all_t)
    rows = slice(offset, offset + local)
    expected = (
        nce_rows_ref(gs[rows], gt, scale, offset) + nce_rows_ref(gt[rows], gs, scale, offset)
    ) / 2
    assert got == pytest.approx(expected, rel=1e-5)
    # the extra negatives change the loss compared with the single-process one
    assert got != pytest.approx(contrastive_loss(s, t, torch.tensor(scale)).item(), rel=1e-3)


# --------------------------------------------------------------------------- relational


def outlier_pair(n: int = 6, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Student with one far point (normalised distances far from the teacher's: |Δ| > 1)."""
    student = randn(n, dim, seed=18) * 0.1
    student[0] += 10.0
    return student, randn(n, dim, seed=19)


@pytest.mark.parametrize("n", [6, 32])  # > 25 rows: torch.cdist switches to a matmul path
def test_rkd_distance_matches_formula(n: int) -> None:
    s, t = unit(n, 5, seed=20), unit(n, 7, seed=21)
    expected = huber_ref(distances_ref(np64(s)), distances_ref(np64(t)))
    assert rkd_distance(s, t).item() == pytest.approx(expected, rel=1e-4)


def test_rkd_distance_both_huber_branches_and_duplicates() -> None:
    s, t = outlier_pair()
    ds, dt = distances_ref(np64(s)), distances_ref(np64(t))
    assert (np.abs(ds - dt) > 1).any() and (np.abs(ds - dt) < 1).any()  # both branches used
    assert rkd_distance(s, t).item() == pytest.approx(huber_ref(ds, dt), rel=1e-5)
    # a duplicated sample: its zero distance is left out of the mean (Park et al.'s code)
    dup = t.clone()
    dup[1] = dup[0]
    expected = huber_ref(distances_ref(np64(s)), distances_ref(np64(dup)))
    assert rkd_distance(s, dup).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [22, 23])
def test_rkd_angle_matches_formula(seed: int) -> None:
    s, t = randn(5, 4, seed=seed), randn(5, 6, seed=seed + 100)
    a_s, a_t = angles_ref(np64(s)), angles_ref(np64(t))
    assert (np.abs(a_s - a_t) > 1).any()  # both Huber branches are exercised
    assert rkd_angle(s, t).item() == pytest.approx(huber_ref(a_s, a_t), rel=1e-5)


def test_rkd_is_invariant_to_similarity_transforms() -> None:
    """Distances (after normalising) and angles survive rotation, scaling and translation."""
    x = randn(7, 6, seed=24)
    q, _ = torch.linalg.qr(randn(6, 6, seed=25))
    y = 3.0 * x @ q + 1.5
    assert rkd_distance(x, y).item() == pytest.approx(0.0, abs=1e-8)
    assert rkd_angle(x, y).item() == pytest.approx(0.0, abs=1e-8)
    assert rkd_distance(x, randn(7, 6, seed=26)).item() > 1e-3


# --------------------------------------------------------------------------- DistillLoss


def losses_cfg(**weights: float) -> DictConfig:
    cfg = OmegaConf.structured(LossesCfg)
    for name, weight in weights.items():
        cfg[name].weight = weight
    return cfg


def inputs(b: int = 6, ds: int = 8, dt: int = 8, c: int = 4, grad: bool = False) -> dict:
    student = unit(b, ds, seed=30)
    logits = randn(b, c, seed=31)
    if grad:
        student.requires_grad_(True)
        logits.requires_grad_(True)
    return {
        "student_embedding": student,
        "student_logits": logits,
        "teacher_embedding": unit(b, dt, seed=32),
        "teacher_logits": randn(b, c, seed=33),
        "labels": torch.tensor([0, 1, 2, 3, 0, 1])[:b],
    }


def test_only_positive_weight_terms_are_computed() -> None:
    loss = DistillLoss(losses_cfg(kd=1.0, relational=0.5), 8, 8)
    x = inputs()
    x["labels"] = None  # ce has weight 0: no labels needed
    terms = loss(**x)
    assert set(terms) == {"kd", "relational"}
    assert loss.uses_teacher
    # a term with weight 0 does not even look at its inputs
    only_ce = DistillLoss(losses_cfg(ce=1.0), 8, 8)
    assert not only_ce.uses_teacher
    x = inputs()
    terms = only_ce(x["student_embedding"], x["student_logits"], None, None, x["labels"])
    assert set(terms) == {"ce"}


def test_terms_and_total_match_the_formulas() -> None:
    weights = {
        "kd": 0.3,
        "logit_mse": 0.8,
        "embed": 2.0,
        "contrastive": 0.7,
        "relational": 1.5,
        "ce": 0.25,
    }
    cfg = losses_cfg(**weights)
    cfg.kd.temperature = 2.0
    cfg.embed.kind = "mse"
    cfg.relational.distance_weight = 3.0
    cfg.relational.angle_weight = 0.5
    cfg.ce.label_smoothing = 0.1
    cfg.contrastive.temperature = 0.2
    loss = DistillLoss(cfg, 8, 8)
    x = inputs()
    terms = loss(**x)
    assert set(terms) == set(TERMS)
    s, t = np64(x["student_embedding"]), np64(x["teacher_embedding"])
    expected = {
        "kd": 4.0 * kl_ref(np64(x["student_logits"]), np64(x["teacher_logits"]), 2.0),
        "logit_mse": float(np.mean((np64(x["student_logits"]) - np64(x["teacher_logits"])) ** 2)),
        "embed": float(np.mean((s - t) ** 2)),
        "contrastive": (nce_rows_ref(s, t, 5.0, 0) + nce_rows_ref(t, s, 5.0, 0)) / 2,
        "relational": 3.0 * huber_ref(distances_ref(s), distances_ref(t))
        + 0.5 * huber_ref(angles_ref(s), angles_ref(t)),
        "ce": ce_ref(np64(x["student_logits"]), x["labels"].numpy(), 0.1),
    }
    for name in TERMS:
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-4), name
    total = sum(weights[name] * expected[name] for name in TERMS)
    assert loss.total(terms).item() == pytest.approx(total, rel=1e-4)


def test_ce_without_labels_raises() -> None:
    loss = DistillLoss(losses_cfg(ce=1.0), 8, 8)
    x = inputs()
    x["labels"] = None
    with pytest.raises(ValueError, match="labels"):
        loss(**x)


@pytest.mark.parametrize("active", ["embed", "contrastive"])
def test_projection_when_dimensions_differ(active: str) -> None:
    loss = DistillLoss(losses_cfg(**{active: 1.0}), 8, 12)
    proj = loss.to_teacher
    assert isinstance(proj, torch.nn.Linear)
    assert (proj.in_features, proj.out_features, proj.bias) == (8, 12, None)
    assert any(p is proj.weight for p in loss.parameters())
    x = inputs(dt=12, grad=True)
    terms = loss(**x)
    mapped = F.normalize(x["student_embedding"] @ proj.weight.T, dim=-1)
    if active == "embed":
        expected = embed_loss(mapped, x["teacher_embedding"], "cosine")
    else:
        expected = contrastive_loss(
            mapped, x["teacher_embedding"], loss.terms["contrastive"].logit_scale
        )
    assert terms[active].item() == pytest.approx(expected.item(), rel=1e-5)
    loss.total(terms).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_no_projection_when_dimensions_match_or_not_needed() -> None:
    assert DistillLoss(losses_cfg(embed=1.0, contrastive=1.0), 8, 8).to_teacher is None
    assert DistillLoss(losses_cfg(embed=1.0), 8, None).to_teacher is None
    # kd and relational compare logits / within-batch structure: no shared space needed
    loss = DistillLoss(losses_cfg(kd=1.0, relational=1.0), 8, 12)
    assert loss.to_teacher is None
    assert set(loss(**inputs(dt=12))) == {"kd", "relational"}


def test_logit_scale_is_clamped() -> None:
    cfg = losses_cfg(contrastive=1.0)
    cfg.contrastive.temperature = 0.001  # 1/T = 1000
    cfg.contrastive.max_logit_scale = 50.0
    loss = DistillLoss(cfg, 8, 8)
    assert loss.terms["contrastive"].logit_scale.item() == pytest.approx(50.0)
    x = inputs()
    s, t = np64(x["student_embedding"]), np64(x["teacher_embedding"])
    expected = (nce_rows_ref(s, t, 50.0, 0) + nce_rows_ref(t, s, 50.0, 0)) / 2
    assert loss(**x)["contrastive"].item() == pytest.approx(expected, rel=1e-4)
    cfg.contrastive.temperature = 0.07
    assert DistillLoss(cfg, 8, 8).terms["contrastive"].logit_scale.item() == pytest.approx(
        1 / 0.07, rel=1e-5
    )


@pytest.mark.parametrize("learn", [True, False])
def test_contrastive_temperature_learnable_or_frozen(learn: bool) -> None:
    cfg = losses_cfg(contrastive=1.0)
    cfg.contrastive.learn_temperature = learn
    loss = DistillLoss(cfg, 8, 8)
    scale = loss.terms["contrastive"].log_logit_scale
    assert scale.requires_grad is learn
    trainable = [p for p in loss.parameters() if p.requires_grad]
    assert any(p is scale for p in trainable) is learn
    loss.total(loss(**inputs(grad=True))).backward()
    grad = scale.grad
    if learn:
        assert grad is not None and grad.abs().item() > 0
    else:
        assert grad is None


def test_no_temperature_parameter_without_contrastive_term() -> None:
    cfg = losses_cfg(embed=1.0)
    cfg.contrastive.learn_temperature = True
    loss = DistillLoss(cfg, 8, 8)
    assert "contrastive" not in loss.terms
    assert not any(p.requires_grad for p in loss.parameters())


@pytest.mark.parametrize("global_negatives", [True, False])
def test_gather_used_only_with_global_negatives(global_negatives: bool) -> None:
    cfg = losses_cfg(contrastive=1.0)
    cfg.contrastive.global_negatives = global_negatives
    loss = DistillLoss(cfg, 8, 8)
    calls: list[int] = []

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        calls.append(1)
        return x, 0

    loss(**inputs(), gather=gather)
    assert len(calls) == (2 if global_negatives else 0)


def test_gradient_reaches_student_not_teacher() -> None:
    loss = DistillLoss(losses_cfg(**dict.fromkeys(TERMS, 1.0)), 8, 8)
    x = inputs(grad=True)
    teacher = x["teacher_embedding"]
    assert not teacher.requires_grad and not x["teacher_logits"].requires_grad
    terms = loss(**x)
    loss.total(terms).backward()
    for name in ("student_embedding", "student_logits"):
        grad = x[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert teacher.grad is None
    # each term on its own also gives a finite gradient to the student
    for name in TERMS:
        fresh = inputs(grad=True)
        value = loss(**fresh)[name]
        on_logits = name in ("kd", "logit_mse", "ce")
        target = fresh["student_logits"] if on_logits else fresh["student_embedding"]
        (grad,) = torch.autograd.grad(value, target)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_relational_gradient_finite_with_duplicate_rows_and_large_batch() -> None:
    student = unit(40, 8, seed=40)
    student[1] = student[0]
    student.requires_grad_(True)
    value = rkd_distance(student, unit(40, 8, seed=41)) + rkd_angle(student, unit(40, 8, seed=41))
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all()
