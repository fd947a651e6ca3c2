"""The layer terms (hint, attention, similarity) and decoupled KD against hand-computed values,
the loss-term registry, and start-up checks of layer names for every adapter family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tiny import term_loss, tiny_spec

from mmkd.adapters import build_adapter
from mmkd.config.schema import LossesCfg
from mmkd.errors import ConfigError
from mmkd.losses import (
    TERMS,
    DistillLoss,
    FeatureTarget,
    LossTerm,
    attention_loss,
    attention_map,
    dkd_loss,
    hint_loss,
    similarity_loss,
    term_classes,
)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# --------------------------------------------------------------------------- formulas


def test_attention_of_two_one_channel_maps_by_hand() -> None:
    # student energy [1, 0] -> map [1, 0]; teacher [0, 2] -> [0, 1]; mean((1-0)^2, (0-1)^2) = 1
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = attention_map(torch.tensor([[[[0.0, 2.0]]]]))
    assert teacher.tolist() == [[[0.0, 1.0]]]
    assert attention_loss(student, teacher).item() == pytest.approx(1.0)
    # equal maps up to scale: zero
    assert attention_loss(3 * student, attention_map(student)).item() == pytest.approx(0.0)


def attention_ref(s: np.ndarray, t: np.ndarray) -> float:
    def at(x: np.ndarray) -> np.ndarray:
        q = (x**2).mean(axis=1).reshape(len(x), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    return float(((at(s) - at(t)) ** 2).mean())


def test_attention_matches_zagoruyko_formula_and_pools_a_larger_student() -> None:
    s, t = randn(3, 5, 4, 4, seed=1), randn(3, 7, 4, 4, seed=2)
    got = attention_loss(s, attention_map(t)).item()
    assert got == pytest.approx(attention_ref(np64(s), np64(t)), rel=1e-5)
    # an 8x8 student map is average-pooled 2x2 to the teacher's 4x4 before normalising
    big = randn(3, 5, 8, 8, seed=3)
    energy = (np64(big) ** 2).mean(axis=1)
    pooled = energy.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4))
    a_s = pooled.reshape(3, -1) / np.linalg.norm(pooled.reshape(3, -1), axis=1, keepdims=True)
    a_t = np64(attention_map(t)).reshape(3, -1)
    assert attention_loss(big, attention_map(t)).item() == pytest.approx(
        float(((a_s - a_t) ** 2).mean()), rel=1e-5
    )


def test_similarity_matches_tung_mori_formula() -> None:
    s, t = randn(4, 3, 2, 2, seed=4), randn(4, 9, seed=5)  # any shapes: only the batch matters
    fs, ft = np64(s).reshape(4, -1), np64(t).reshape(4, -1)

    def gram(f: np.ndarray) -> np.ndarray:
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(fs) - gram(ft)) ** 2).sum() / 16
    assert similarity_loss(s, t).item() == pytest.approx(float(expected), rel=1e-5)
    assert similarity_loss(s, 2 * s).item() == pytest.approx(0.0, abs=1e-7)


def test_hint_is_mse_after_matching_the_teacher_size() -> None:
    s, t = randn(2, 3, 4, 4, seed=6), randn(2, 3, 2, 2, seed=7)
    pooled = np64(s).reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    assert hint_loss(s, t).item() == pytest.approx(float(((pooled - np64(t)) ** 2).mean()))


def dkd_ref(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, a: float, b: float, t: float) -> float:
    """Zhao et al.'s reference implementation (mdistiller), in numpy."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    gt = np.eye(zs.shape[1])[y]
    ps, pt = softmax(zs / t), softmax(zt / t)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() / len(zs) * t * t
    ns, nt = softmax(zs / t - 1000.0 * gt), softmax(zt / t - 1000.0 * gt)
    keep = gt == 0
    nckd = (nt * (np.log(nt) - np.log(ns)))[keep].sum() / len(zs) * t * t
    return a * tckd + b * nckd


def test_dkd_matches_the_reference_implementation() -> None:
    zs, zt = randn(6, 5, seed=8) * 3, randn(6, 5, seed=9) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    got = dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0).item()
    assert got == pytest.approx(dkd_ref(np64(zs), np64(zt), y.numpy(), 1.0, 8.0, 4.0), rel=1e-5)
    # alpha alone is TCKD, beta alone NCKD: they add up
    tckd = dkd_loss(zs, zt, y, 1.0, 0.0, 4.0).item()
    nckd = dkd_loss(zs, zt, y, 0.0, 1.0, 4.0).item()
    assert got == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)
    assert dkd_loss(zt, zt, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- registry


def test_every_term_is_in_the_registry_and_the_schema() -> None:
    names = [cls.name for cls in term_classes()]
    assert {"kd", "embed", "contrastive", "relational", "ce"} <= set(names)
    assert {"hint", "attention", "similarity", "dkd"} <= set(names)
    cfg = OmegaConf.structured(LossesCfg)
    for cls in term_classes():
        assert issubclass(cls, LossTerm) and TERMS.get(cls.name) is cls
        assert cfg[cls.name].weight == 0.0  # off unless asked for
    with pytest.raises(ConfigError, match=r"Valid names: .*attention"):
        TERMS.get("atention")


def test_term_settings_are_checked_by_the_registry() -> None:
    from mmkd.config import compose, validate

    for override, message in [
        ("losses.dkd.temperature=0", r"losses\.dkd\.temperature: must be > 0"),
        ("losses.dkd.beta=-1", r"losses\.dkd\.beta: must be >= 0"),
        ("losses.embed.kind=l1", r"losses\.embed\.kind: 'l1' is not one of"),
        ("losses.hint.weight=-1", r"losses\.hint\.weight: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose(["losses.kd.weight=1", override]))
    with pytest.raises(ConfigError, match=r"losses\.dkd\.weight: .*train_labels=false"):
        validate(compose(["losses.dkd.weight=1", "data.train_labels=false"]))
    with pytest.raises(ConfigError, match=r"losses\.dkd: needs every teacher logit"):
        validate(
            compose(
                [
                    "losses.dkd.weight=1",
                    "data.train_labels=true",
                    "distill.cache=true",
                    "distill.store.logits_topk=2",
                ]
            )
        )


# --------------------------------------------------------------------------- layer terms on models


def models(student: str, teacher: str):
    s = build_adapter(tiny_spec(student), key="student")
    t = build_adapter(tiny_spec(teacher), key="teacher")
    return s, t


@pytest.mark.parametrize(
    ("family", "good", "bad"),
    [
        ("image", "layer2", "layer9"),
        ("audio_timm", "layer1", "stages.1"),
        ("text", "hidden_states.2", "hidden_states.3"),
        ("audio_cnn", "block2", "block3"),
        ("audio_wav2vec2", "layers.1", "layer.1"),
    ],
)
def test_a_layer_typo_fails_naming_the_valid_layers(family: str, good: str, bad: str) -> None:
    student, teacher = models(family, family)
    assert good in student.feature_names()
    term_loss("similarity", [[good, good]], student, teacher)  # fine
    with pytest.raises(ConfigError, match=rf"no feature '{bad}'; valid: .*{good}") as err:
        term_loss("similarity", [[bad, good]], student, teacher)
    assert "student" in str(err.value) and "losses" in str(err.value)
    with pytest.raises(ConfigError, match=rf"teacher.*no feature '{bad}'"):
        term_loss("similarity", [[good, bad]], student, teacher)


def test_pairs_must_be_given_as_student_teacher_lists() -> None:
    student, teacher = models("image", "image")
    with pytest.raises(ConfigError, match=r"losses\.hint\.pairs: list at least one"):
        term_loss("hint", [], student, teacher)
    with pytest.raises(ConfigError, match=r"losses\.hint\.pairs\[0\]"):
        term_loss("hint", [["layer1"]], student, teacher)


def test_attention_needs_spatial_features() -> None:
    student, teacher = models("text", "text")
    with pytest.raises(ConfigError, match="attention needs spatial features"):
        term_loss("attention", [["hidden_states.1", "hidden_states.1"]], student, teacher)


def test_hint_regresses_student_channels_onto_the_teacher_and_trains() -> None:
    student, teacher = models("audio_cnn", "image")  # 8 -> 8 channels, 16x26 -> 16x16... pooled
    s_shape = student.feature_shapes(["block1"])["block1"]
    t_shape = teacher.feature_shapes(["layer1"])["layer1"]
    loss = term_loss("hint", [["block1", "layer1"]], student, teacher)
    regressor = loss.terms["hint"].regressors[0]
    assert isinstance(regressor, torch.nn.Conv2d)
    assert (regressor.in_channels, regressor.out_channels) == (s_shape[0], t_shape[0])
    assert loss.student_layers() == ["block1"]
    assert loss.teacher_features() == [FeatureTarget("layer1")]
    batch = {k: randn(*v.shape, seed=11) for k, v in student.example_batch(2).items()}
    s_out = student(batch, layers=["block1"])
    t_feat = randn(2, *t_shape, seed=10)
    terms = loss(
        s_out.embedding,
        s_out.logits,
        None,
        None,
        None,
        student_layers=s_out.layers,
        teacher_features={"layer1": t_feat},
    )
    expected = hint_loss(
        regressor(F.adaptive_avg_pool2d(s_out.layers["block1"], t_shape[1:]))
        if s_shape[1] >= t_shape[1] and s_shape[2] >= t_shape[2]
        else regressor(F.interpolate(s_out.layers["block1"], t_shape[1:], mode="bilinear")),
        t_feat,
    )
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["hint"].backward()
    assert regressor.weight.grad is not None and regressor.weight.grad.abs().sum() > 0


def test_attention_asks_the_teacher_for_its_attention_map_only() -> None:
    student, teacher = models("image", "image")
    loss = term_loss("attention", [["layer1", "layer2"], ["layer3", "layer3"]], student, teacher)
    assert loss.teacher_features() == [
        FeatureTarget("layer2", "attention"),
        FeatureTarget("layer3", "attention"),
    ]
    assert FeatureTarget("layer2", "attention").name == "layer2@attention"


def test_logit_terms_need_classifiers_with_the_same_classes() -> None:
    student = build_adapter(tiny_spec("image"), key="student")
    text = build_adapter(tiny_spec("text", head__classifier=False), key="teacher")
    cfg = OmegaConf.structured(LossesCfg)
    cfg.kd.weight = 1.0
    with pytest.raises(ConfigError, match=r"teacher\.head\.classifier: losses\.kd needs"):
        DistillLoss(cfg, 16, 16, student=student, teacher=text)
    other = build_adapter(tiny_spec("image", head__num_classes=5), key="teacher")
    with pytest.raises(ConfigError, match=r"student\.head\.num_classes: losses\.kd compares"):
        DistillLoss(cfg, 16, 16, student=student, teacher=other)
    cfg.kd.weight, cfg.ce.weight = 0.0, 1.0
    headless = build_adapter(tiny_spec("image", head__classifier=False), key="student")
    with pytest.raises(ConfigError, match=r"student\.head\.classifier: losses\.ce needs"):
        DistillLoss(cfg, 16, 16, student=headless, teacher=None)


def test_a_layer_typo_stops_the_run_at_start_up(tmp_path, capsys) -> None:
    from tiny import small_run, tiny_overrides

    from mmkd.train import main

    code = main(
        [
            *small_run(),
            f"run.dir={tmp_path}",
            "teacher=none",
            "losses=supervised",
            "data.train_labels=true",
            *tiny_overrides("student", "image"),
            "student.head.classifier=true",
            "student.features=[layer5]",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "student.features: image model has no feature 'layer5'" in err
    assert "valid: act1, layer1, layer2, layer3, layer4" in err
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_mmkd_layers_lists_each_models_layers_and_shapes(capsys) -> None:
    from tiny import tiny_overrides

    from mmkd.cli import main

    args = ["layers", "teacher=none", "losses=supervised", "data.train_labels=true"]
    assert main([*args, *tiny_overrides("student", "audio_cnn")]) == 0
    out = capsys.readouterr().out
    assert "student (audio_cnn): 2 layers" in out
    assert "block1" in out and "(8, 8, 26)" in out and "block2" in out


def test_dkd_weight_ramps_up_over_its_warmup_epochs() -> None:
    cfg = OmegaConf.structured(LossesCfg)
    cfg.dkd.weight, cfg.dkd.warmup_epochs = 1.0, 2.0
    loss = DistillLoss(cfg, 8, 8)
    zs, zt = randn(6, 5, seed=12), randn(6, 5, seed=13)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    full = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)
    for epoch, share in [(0.0, 0.0), (0.5, 0.25), (2.0, 1.0), (7.0, 1.0)]:
        terms = loss(randn(6, 8, seed=1), zs, randn(6, 8, seed=2), zt, y, epoch=epoch)
        assert terms["dkd"].item() == pytest.approx(share * full.item(), rel=1e-5, abs=1e-7)


def test_a_terms_wrong_setting_is_named_at_its_losses_key() -> None:
    """The term reports `pairs[0]`; the loss assembly names the teacher's losses section."""
    from mmkd.losses import DistillLoss

    student = build_adapter(tiny_spec("image"), key="student")
    teacher = build_adapter(tiny_spec("image"), key="teachers.t")
    cfg = OmegaConf.structured(LossesCfg)
    cfg.hint.weight, cfg.hint.pairs = 1.0, [["layer1"]]
    with pytest.raises(ConfigError, match=r"^teachers\.t\.losses\.hint\.pairs\[0\]: \['layer1'\]"):
        DistillLoss(cfg, 16, 16, student=student, teacher=teacher, key="teachers.t.losses")
