"""Teacher store: hit, miss, key ingredients, damage, resumable build, views consistent with the
student's replayed augmentation, compact dtypes, and the same training as a live teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import small_run, tiny_overrides, tiny_spec

from mmkd.adapters import build_adapter
from mmkd.config.schema import DemoCfg
from mmkd.data.datamodule import ResumableBatchSampler, RoleCollate, ViewedDataset
from mmkd.data.demo import DemoDataset
from mmkd.errors import CheckpointError, ConfigError
from mmkd.export import load_exported
from mmkd.io import save_state
from mmkd.replay import ViewPolicy
from mmkd.store import StoreBuilder, StoreSpec, TeacherStore, open_or_build, teacher_collate
from mmkd.store import key as store_key_module
from mmkd.train import main

DATA = {"data": "demo", "size": 24}
AUGMENT = {"image__augment": True, "image__crop_padding": 4, "image__hflip": 0.5}


def teacher(**overrides):
    return build_adapter(tiny_spec("image", **overrides), key="teacher").eval()


def builder(model, dataset, spec=None, data=DATA, augmented=False):
    spec = spec or StoreSpec()
    collate = teacher_collate(model.make_preprocessor(), augmented=augmented, seed=spec.seed)
    return StoreBuilder(
        model,
        dataset,
        collate,
        data,
        spec,
        augmented=augmented,
        batch_size=8,
        device=torch.device("cpu"),
    )


def build(root, model, dataset, **kwargs):
    return open_or_build(root, builder(model, dataset, **kwargs))


@pytest.fixture(scope="module")
def dataset():
    return DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)


def live(model, dataset, indices, views=None, seed=0):
    """The teacher's outputs computed now, on the views the store should hold."""
    pre = model.make_preprocessor()
    collate = RoleCollate(
        {"teacher": pre},
        train=views is not None,
        keep_labels=False,
        num_classes=0,
        replay_seed=seed,
    )
    viewed = ViewedDataset(dataset)
    batch = collate(
        [
            viewed[(i, 0 if views is None else v)]
            for i, v in zip(indices, views or [0] * len(indices), strict=True)
        ]
    )
    with torch.no_grad():
        return model(batch["inputs"]["teacher"])


def test_miss_then_hit_serves_what_the_teacher_computes(tmp_path, dataset):
    model = teacher()
    folder, seconds = build(tmp_path, model, dataset)
    assert seconds is not None
    again, seconds_again = build(tmp_path, model, dataset)
    assert again == folder and seconds_again is None  # a hit: nothing recomputed
    store = TeacherStore.open(folder)
    ids = [dataset[i]["id"] for i in (5, 0, 17)]
    stored = store.lookup(ids)
    out = live(model, dataset, [5, 0, 17])
    torch.testing.assert_close(stored.embedding, out.embedding, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stored.logits, out.logits, atol=1e-6, rtol=1e-5)
    assert len(store) == 24
    with pytest.raises(CheckpointError, match="not in it"):
        store.lookup(["no-such-sample"])


def test_every_view_holds_the_teacher_output_on_that_augmented_view(tmp_path, dataset):
    model = teacher(**AUGMENT)
    spec = StoreSpec(views=3, seed=7)
    folder, _ = build(tmp_path, model, dataset, spec=spec, augmented=True)
    store = TeacherStore.open(folder)
    indices, views = [3, 3, 3, 11, 0], [0, 1, 2, 2, 1]
    stored = store.lookup([dataset[i]["id"] for i in indices], views)
    out = live(model, dataset, indices, views, seed=7)
    torch.testing.assert_close(stored.embedding, out.embedding, atol=1e-6, rtol=1e-5)
    # views of one sample differ (the augmentation is random), so the store kept each of them
    assert not torch.allclose(stored.embedding[0], stored.embedding[1])
    with pytest.raises(CheckpointError, match="holds 3 views"):
        store.lookup([dataset[0]["id"]], [3])


def test_student_input_replays_the_view_the_teacher_was_fed(dataset):
    """Consistent teaching: the training loader's student input at epoch e is, bit for bit,
    the input the store's teacher got for view e mod K (same modality and settings)."""
    model = teacher(**AUGMENT)
    student_pre = build_adapter(tiny_spec("image", **AUGMENT), key="student").make_preprocessor()
    policy = ViewPolicy(seed=5, views=3)
    train_collate = RoleCollate(
        {"student": student_pre}, train=True, keep_labels=False, num_classes=0, replay_seed=5
    )
    build_collate = teacher_collate(model.make_preprocessor(), augmented=True, seed=5)
    sampler = torch.utils.data.RandomSampler(dataset)
    viewed = ViewedDataset(dataset)
    for epoch in (0, 4):
        sampler.epoch = epoch  # as DistributedSampler.set_epoch would
        batches = ResumableBatchSampler(sampler, 8, policy, len(dataset))
        first = next(iter(batches))
        assert {view for _, view in first} == {epoch % 3}
        student = train_collate([viewed[key] for key in first])
        teacher_fed = build_collate([viewed[key] for key in first])
        assert student["views"] == [epoch % 3] * 8
        assert torch.equal(
            student["inputs"]["student"]["pixels"], teacher_fed["inputs"]["teacher"]["pixels"]
        )


@pytest.mark.parametrize(
    "change",
    ["weights", "preprocessing", "augmentation", "libraries", "data", "views", "seed", "dtype"],
)
def test_the_key_changes_with_each_ingredient(dataset, monkeypatch, change):
    base_model = teacher(**AUGMENT)
    spec = StoreSpec(views=2, seed=0)
    base = builder(base_model, dataset, spec, augmented=True).key
    model, data = base_model, DATA
    if change == "weights":
        model = teacher(**AUGMENT)
        model.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            next(model.parameters()).add_(0.01)
    elif change == "preprocessing":
        model = teacher(**AUGMENT, image__img_size=28)
    elif change == "augmentation":
        model = teacher(**{**AUGMENT, "image__hflip": 0.0})
    elif change == "libraries":
        versions = store_key_module.library_versions()
        monkeypatch.setattr(
            store_key_module, "library_versions", lambda: {**versions, "timm": "0.0.1"}
        )
    elif change == "data":
        data = {**DATA, "size": 25}
    elif change == "views":
        spec = StoreSpec(views=3, seed=0)
    elif change == "seed":
        spec = StoreSpec(views=2, seed=1)
    elif change == "dtype":
        spec = StoreSpec(views=2, seed=0, dtype="float16")
    if change not in ("weights", "preprocessing", "augmentation"):
        model = base_model
    assert builder(model, dataset, spec, data, augmented=True).key != base


def test_damaged_entry_is_reported_and_rebuilt(tmp_path, dataset, caplog):
    model = teacher()
    folder, _ = build(tmp_path, model, dataset)
    array = folder / "embedding.npy"
    array.write_bytes(array.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"embedding\.npy"):
        TeacherStore.open(folder)
    again, seconds = build(tmp_path, model, dataset)
    assert again == folder and seconds is not None
    assert "rebuilding" in caplog.text
    meta = json.loads((folder / "meta.json").read_text())
    assert np.load(folder / "embedding.npy").shape == tuple(meta["arrays"]["embedding"]["shape"])


def test_a_killed_build_resumes_at_the_first_unfinished_chunk(tmp_path, dataset, monkeypatch):
    model = teacher(**AUGMENT)
    spec = StoreSpec(views=2, seed=3, chunk_size=8)  # 3 chunks of 8 samples x 2 views
    calls = {"n": 0}
    forward = type(model).forward

    def dying_forward(self, batch, layers=()):
        calls["n"] += 1
        if calls["n"] == 6:  # a shape probe, then chunks 0 and 1 (2 batches each) are done
            raise KeyboardInterrupt
        return forward(self, batch, layers)

    monkeypatch.setattr(type(model), "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, model, dataset, spec=spec, augmented=True)
    partial = next(tmp_path.glob("*.partial"))
    assert sorted(p.name for p in (partial / "chunks").iterdir()) == ["0.done", "8.done"]
    calls["n"] = -100  # no more deaths
    folder, _ = build(tmp_path, model, dataset, spec=spec, augmented=True)
    assert calls["n"] == -100 + 2 + 1  # the output-shape probe, then chunk 2's two batches only
    resumed = TeacherStore.open(folder)
    monkeypatch.setattr(type(model), "forward", forward)
    whole, _ = build(tmp_path / "whole", model, dataset, spec=spec, augmented=True)
    uninterrupted = TeacherStore.open(whole)
    for name in ("embedding", "logits", "present"):
        assert np.array_equal(resumed.arrays[name], uninterrupted.arrays[name])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compact_dtypes_round_trip_within_their_precision(tmp_path, dataset, dtype):
    model = teacher()
    folder, _ = build(tmp_path, model, dataset, spec=StoreSpec(dtype=dtype))
    stored = TeacherStore.open(folder).lookup([dataset[i]["id"] for i in range(6)])
    out = live(model, dataset, list(range(6)))
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-3
    torch.testing.assert_close(stored.embedding, out.embedding, atol=tolerance, rtol=tolerance)
    assert stored.embedding.dtype == torch.float32


def test_top_k_logits_keep_the_largest_and_drop_the_rest(tmp_path, dataset):
    model = teacher(head__num_classes=5)
    folder, _ = build(tmp_path, model, dataset, spec=StoreSpec(logits_topk=2))
    stored = TeacherStore.open(folder).lookup([dataset[i]["id"] for i in range(4)])
    full = live(model, dataset, list(range(4))).logits
    top = full.topk(2, dim=-1)
    kept = torch.isfinite(stored.logits)
    assert kept.sum(dim=-1).tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(stored.logits.gather(-1, top.indices), top.values)
    probs = torch.softmax(stored.logits, dim=-1)  # renormalised over the two kept classes
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_a_store_over_its_size_limit_is_refused_before_writing(tmp_path, dataset):
    with pytest.raises(ConfigError, match=r"distill\.store\.max_gb"):
        build(tmp_path, teacher(), dataset, spec=StoreSpec(views=1, max_gb=1e-9))
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # the builders' lock


def test_stored_and_live_teacher_train_the_same_student(tmp_path):
    common = [
        *tiny_overrides("teacher", "image"),
        "teacher.head.embed_dim=16",
        "teacher.head.classifier=true",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        "losses=kd",
        "losses.embed.weight=0.5",
        "data.train_labels=true",
        *small_run(epochs=2),
    ]
    assert main([*common, f"run.dir={tmp_path / 'live'}"]) == 0
    # distill.cache=true is the one-view store, as before
    assert main([*common, "distill.cache=true", f"run.dir={tmp_path / 'cached'}"]) == 0
    assert len(list((tmp_path / "cached" / "teacher_cache").iterdir())) == 2  # train, val
    live_state = load_exported(tmp_path / "live" / "student").model.state_dict()
    cached = load_exported(tmp_path / "cached" / "student").model.state_dict()
    for key, value in live_state.items():
        torch.testing.assert_close(cached[key], value, atol=1e-5, rtol=1e-4)


def test_augmented_store_run_trains_and_reuses_the_store_across_seeds(tmp_path):
    """K augmented views of an image teacher for an image student, both augmented alike: the
    second run (another run.seed) finds the store built by the first."""
    augment = ["image.augment=true", "image.crop_padding=2", "image.hflip=0.5"]
    weights = tmp_path / "teacher.safetensors"  # fixed weights: a random teacher moves with seed
    save_state(weights, teacher(head__embed_dim=16, head__num_classes=9).state_dict())
    common = [
        *tiny_overrides("teacher", "image"),
        f"teacher.weights={weights}",
        "teacher.head.embed_dim=16",
        "teacher.head.classifier=true",
        *[f"teacher.{a}" for a in augment],
        *tiny_overrides("student", "image"),
        "student.head.classifier=true",
        *[f"student.{a}" for a in augment],
        "losses=kd",
        "data.train_labels=true",
        "distill.store.views=3",
        f"distill.cache_dir={tmp_path / 'store'}",
        *small_run(epochs=2),
    ]
    assert main([*common, "run.seed=0", f"run.dir={tmp_path / 'a'}"]) == 0
    entries = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert len(entries) == 2  # train (3 views) and val (1 view)
    assert main([*common, "run.seed=1", f"run.dir={tmp_path / 'b'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == entries
    metas = [json.loads((tmp_path / "store" / e / "meta.json").read_text()) for e in entries]
    assert sorted(m["views"] for m in metas) == [1, 3]


def test_teacher_features_are_stored_per_view_in_the_form_terms_read(tmp_path, dataset):
    from mmkd.losses import FeatureTarget, attention_map

    model = teacher(**AUGMENT)
    targets = (FeatureTarget("layer2"), FeatureTarget("layer1", "attention"))
    spec = StoreSpec(views=2, seed=3, dtype="float16", features=targets)
    folder, _ = build(tmp_path, model, dataset, spec=spec, augmented=True)
    store = TeacherStore.open(folder)
    assert store.meta["features"] == ["layer2", "layer1@attention"]
    shapes = model.feature_shapes(["layer1", "layer2"])
    # the attention target keeps only the (H, W) map, not the (C, H, W) layer
    assert store.arrays["feature.1"].shape == (24, 2, *shapes["layer1"][1:])
    assert store.arrays["feature.0"].shape == (24, 2, *shapes["layer2"])
    assert store.arrays["feature.0"].dtype == np.float16
    indices, views = [4, 4, 9], [0, 1, 1]
    stored = store.lookup([dataset[i]["id"] for i in indices], views)
    pre = model.make_preprocessor()
    collate = RoleCollate(
        {"teacher": pre}, train=True, keep_labels=False, num_classes=0, replay_seed=3
    )
    batch = collate([ViewedDataset(dataset)[(i, v)] for i, v in zip(indices, views, strict=True)])
    with torch.no_grad():
        out = model(batch["inputs"]["teacher"], layers=["layer1", "layer2"])
    torch.testing.assert_close(
        stored.features["layer2"], out.layers["layer2"], atol=2e-3, rtol=2e-3
    )
    torch.testing.assert_close(
        stored.features["layer1@attention"],
        attention_map(out.layers["layer1"]),
        atol=2e-3,
        rtol=2e-3,
    )
    # features are part of the key: the same teacher without them is another entry
    plain = builder(
        model, dataset, spec=StoreSpec(views=2, seed=3, dtype="float16"), augmented=True
    )
    assert plain.key != builder(model, dataset, spec=spec, augmented=True).key


def test_a_store_too_big_because_of_features_says_so(tmp_path, dataset):
    from mmkd.losses import FeatureTarget

    spec = StoreSpec(views=1, max_gb=1e-5, features=(FeatureTarget("layer1"),))
    with pytest.raises(ConfigError, match=r"GB of it teacher features.*max_gb"):
        build(tmp_path, teacher(), dataset, spec=spec)


def test_store_identity_follows_a_manifests_rows_not_its_mtime(tmp_path):
    """A manifest is keyed by the rows read from it, through a transfer mix too: writing the
    same rows again keeps the key, a changed transfer text (same ids) changes it."""
    import os

    from mmkd.data.manifest import ClassSet, ManifestDataset, read_manifest
    from mmkd.data.transfer import TransferMix, drop_labels

    train, transfer = tmp_path / "train.csv", tmp_path / "phrases.csv"
    train.write_text("text,label\na good film,pos\na bad film,neg\n")
    transfer.write_text("text,label\ngood,pos\nbad,neg\n")

    def content() -> dict:
        classes = ClassSet(["neg", "pos"], indices_allowed=False)
        rows = ManifestDataset(train, read_manifest(train, "train"), ("text",), classes)
        extra = drop_labels(read_manifest(transfer, "transfer"))
        mix = TransferMix(rows, ManifestDataset(transfer, extra, ("text",), classes))
        return store_key_module.data_content(mix)

    first = content()
    assert first["files"] == 4  # each row names its manifest
    stat = train.stat()
    train.write_text(train.read_text())  # the same rows, written again: a new mtime
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert content() == first
    transfer.write_text("text,label\ngood,pos\nawful,neg\n")  # same ids (lines), new text
    assert content() != first
