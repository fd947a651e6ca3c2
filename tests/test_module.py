"""The frozen teacher stays frozen; the optimizer and checkpoints only see the student."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from tiny import tiny_spec

from mmkd.config.schema import Config
from mmkd.distill_module import DistillModule


def make_module(**loss_weights: float) -> DistillModule:
    from mmkd.adapters import build_adapter

    cfg = OmegaConf.structured(Config)
    for name, weight in (loss_weights or {"kd": 1.0, "contrastive": 1.0}).items():
        cfg.losses[name].weight = weight
    teacher = build_adapter(tiny_spec("image", head__embed_dim=16), key="teacher")
    student = build_adapter(tiny_spec("audio_cnn", head__embed_dim=8), key="student")
    return DistillModule.from_config(cfg, teacher, {"student": student}, ["a", "b", "c"])


def batch_for(module: DistillModule, size: int = 4) -> dict:
    torch.manual_seed(0)
    return {
        "inputs": {
            "teacher": {
                k: torch.randn_like(v) for k, v in module.teacher.example_batch(size).items()
            },
            "student": {
                k: torch.randn_like(v)
                for k, v in module.students["student"].example_batch(size).items()
            },
        },
        "ids": [str(i) for i in range(size)],
        "labels": torch.tensor([0, 1, 2, 0][:size]),
        "skipped": 0,
    }


def test_teacher_is_frozen_unregistered_and_stays_in_eval_mode():
    module = make_module()
    teacher = module.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    module.train()
    assert not teacher.training and module.students["student"].training
    names = [n for n, _ in module.named_parameters()]
    assert names and not any(n.startswith("teacher") for n in names)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}


def test_teacher_follows_the_module_across_dtypes():
    module = make_module()
    module.to(torch.float64)
    assert next(module.teacher.parameters()).dtype == torch.float64
    module.to(torch.float32)
    assert next(module.teacher.parameters()).dtype == torch.float32


def test_a_training_step_updates_the_student_and_not_the_teacher():
    module = make_module()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.students.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    module.train()
    loss = module.training_step(batch_for(module), 0)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher_before.items())
    changed = [
        k
        for k, v in student_before.items()
        if v.is_floating_point() and not torch.equal(v, module.students.state_dict()[k])
    ]
    assert changed


def test_loss_terms_are_logged_by_name_and_summed_by_weight(monkeypatch):
    module = make_module(kd=2.0, ce=0.5)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log_dict", lambda d, **_: logged.update(d))
    monkeypatch.setattr(module, "log", lambda k, v, **_: logged.__setitem__(k, v))
    total = module.training_step(batch_for(module), 0)
    assert set(logged) == {"train/kd", "train/ce", "train/loss"}
    expected = 2.0 * logged["train/kd"] + 0.5 * logged["train/ce"]
    assert torch.isclose(total, expected)


def nan_terms(module: DistillModule, monkeypatch) -> None:
    loss = module.losses["student"]["teacher"]  # the one teacher's terms
    real = loss.forward

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms["kd"] = terms["kd"] * float("nan")
        return terms

    monkeypatch.setattr(loss, "forward", poisoned)


def test_nonfinite_loss_stops_the_run_naming_the_term(monkeypatch):
    import pytest

    from mmkd.distill_module import NonFiniteLossError

    module = make_module(kd=1.0, ce=1.0)
    nan_terms(module, monkeypatch)
    with pytest.raises(NonFiniteLossError, match=r"train/kd=nan.*nonfinite_loss=skip"):
        module.training_step(batch_for(module), 0)


def test_nonfinite_loss_skip_leaves_the_parameters_alone(monkeypatch):
    module = make_module(kd=1.0, ce=1.0)
    module.distill.nonfinite_loss = "skip"
    nan_terms(module, monkeypatch)
    before = {k: v.clone() for k, v in module.students.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1)
    loss = module.training_step(batch_for(module), 0)
    loss.backward()
    assert module.skip_step
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    after = dict(module.students.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the step was skipped
