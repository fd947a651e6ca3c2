"""In the cross-modal experiment labels never reach the loss: the config withholds them and
the training batches carry none."""

from __future__ import annotations

import inspect

from tiny import small_run, tiny_overrides

from mmkd.config import compose, validate
from mmkd.losses import DistillLoss
from mmkd.train import main


def test_the_experiment_withholds_labels_and_uses_teacher_terms_only():
    cfg = compose(["experiment=av_digits_xmodal", "teacher.weights=/any/run/student"])
    validate(cfg)
    assert cfg.data.train_labels is False
    assert cfg.losses.ce.weight == 0
    assert {n for n in ("kd", "embed", "contrastive", "relational") if cfg.losses[n].weight > 0}


def test_no_label_reaches_the_loss_during_training(tmp_path, monkeypatch):
    seen: list[object] = []
    real = DistillLoss.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append(inspect.signature(real).bind(self, *args, **kwargs).arguments["labels"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DistillLoss, "forward", spy)
    # the experiment's own settings, on the generated demo pairs with tiny models
    code = main(
        [
            "experiment=av_digits_xmodal",
            "teacher.weights=null",
            "data=demo",
            *tiny_overrides("teacher", "image"),
            "teacher.head.embed_dim=16",
            *tiny_overrides("student", "audio_cnn"),
            *small_run(),
            f"run.dir={tmp_path}",
        ]
    )
    assert code == 0
    assert seen and all(labels is None for labels in seen)
