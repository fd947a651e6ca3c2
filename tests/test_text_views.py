"""Replayable text views (Tang et al.'s masking and n-gram sampling) as teacher-store views, and a
transfer set of unlabelled rows mixed into the labelled ones (ce skips them, KD uses them)."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import tiny_spec
from torch.utils.data import DataLoader, Dataset

from mmkd.adapters import build_adapter
from mmkd.adapters.text_augment import TextAugment
from mmkd.config.schema import LossesCfg
from mmkd.data.datamodule import RoleCollate, ViewedDataset
from mmkd.errors import ConfigError, DataError
from mmkd.losses import IGNORE_LABEL, DistillLoss
from mmkd.replay import replay_scope
from mmkd.store import StoreBuilder, StoreSpec, TeacherStore, open_or_build, teacher_collate
from mmkd.teacher_source import check_same_views

TANG = {"text__augment__mask_prob": 0.1, "text__augment__ngram_prob": 0.25}
SENTENCES = (
    "the movie is a charming and often affecting journey",
    "it 's a lovely film with lovely performances by buy and accorsi",
    "an absurdist spider web",
    "effective but too-tepid biopic",
    "the acting , costumes , music , cinematography and sound are all astounding",
    "a gorgeous , witty , seductive movie",
)
KEYS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 5), (2, 3), (4, 1), (5, 7), (4, 2), (3, 0)]


class Sentences(Dataset):
    def __len__(self) -> int:
        return len(SENTENCES)

    def sample_id(self, index: int) -> str:
        return f"sst:{index}"

    def __getitem__(self, index: int) -> dict:
        return {"id": f"sst:{index}", "label": index % 2, "text": SENTENCES[index]}


@functools.cache
def text_model(key: str = "student", **overrides) -> torch.nn.Module:
    return build_adapter(tiny_spec("text", **overrides), key=key).eval()


# --------------------------------------------------------------------------- the rules


def test_masking_and_ngram_sampling_follow_tang_et_al() -> None:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    text = " ".join(words)
    assert TextAugment("[MASK]", mask_prob=1.0)(text) == " ".join(["[MASK]"] * 10)
    assert TextAugment("[MASK]", mask_prob=0.5, keep_prob=1.0)(text) == text
    np.random.seed(0)
    ngram = TextAugment("[MASK]", ngram_prob=1.0, ngram_max=3)
    lengths = set()
    for _ in range(200):
        view = ngram(text).split()
        lengths.add(len(view))
        start = words.index(view[0])
        assert view == words[start : start + len(view)]  # a contiguous n-gram
    assert lengths == {1, 2, 3}
    # rates over many draws: each word masked with p 0.1, an n-gram kept with p 0.25
    tang = TextAugment("[MASK]", mask_prob=0.1, ngram_prob=0.25)
    masked = sampled = 0
    draws = 4000
    for _ in range(draws):
        view = tang(text).split()
        masked += view.count("[MASK]") if len(view) == 10 else 0
        sampled += len(view) < 10
    kept_whole = draws - sampled
    assert masked / (10 * kept_whole) == pytest.approx(0.1, abs=0.01)
    # an n-gram of all 10 words is impossible with n <= 5, so a shorter view is a sampled one
    assert sampled / draws == pytest.approx(0.25, abs=0.025)


def test_augment_settings_are_checked_at_start_up() -> None:
    from tiny import tiny_overrides

    from mmkd.config import compose, validate

    base = [*tiny_overrides("student", "text"), "teacher=none", "losses=supervised"]
    with pytest.raises(
        ConfigError, match=r"student\.text\.augment\.mask_prob: must be in \[0, 1\]"
    ):
        validate(compose([*base, "student.text.augment.mask_prob=1.5"]))
    with pytest.raises(ConfigError, match=r"student\.text\.augment\.ngram_max: must be > 0"):
        validate(compose([*base, "student.text.augment.ngram_max=0"]))
    with pytest.raises(ConfigError, match=r"data\.manifest\.transfer: .*data\.name=demo"):
        validate(compose([*base, "data.manifest.transfer=phrases.csv"]))


# --------------------------------------------------------------------------- replay


VIEWS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    from test_text_views import text_views
    ids, strings = text_views(workers=0)
    json.dump({"ids": ids.tolist(), "strings": strings}, open(sys.argv[1], "w"))
    """
)


def text_views(workers: int, seed: int = 42) -> tuple[torch.Tensor, list[str]]:
    """Token ids of the views of KEYS ((index, view) pairs) as a training loader with `workers`
    workers batches them, and the view strings replayed directly."""
    pre = text_model(**TANG).make_preprocessor()
    assert pre.randomized_in_training
    collate = RoleCollate(
        {"student": pre}, train=True, keep_labels=False, num_classes=0, replay_seed=seed
    )
    loader = DataLoader(
        ViewedDataset(Sentences()),
        batch_sampler=[KEYS[:4], KEYS[4:]],
        num_workers=workers,
        collate_fn=collate,
    )
    ids = [b["inputs"]["student"]["input_ids"] for b in loader]
    width = max(i.shape[1] for i in ids)
    ids = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in ids])
    strings = []
    for index, view in KEYS:
        with replay_scope(seed, f"sst:{index}", view):
            strings.append(pre.augment(SENTENCES[index]))  # what pre(...) tokenises
    return ids, strings


def test_text_views_replay_bit_for_bit_across_workers_and_processes(tmp_path) -> None:
    ids, strings = text_views(workers=0)
    with_workers, strings_again = text_views(workers=2)
    assert torch.equal(ids, with_workers) and strings == strings_again
    out = tmp_path / "views.json"
    subprocess.run([sys.executable, "-c", VIEWS_SCRIPT, str(out)], check=True)
    other = json.loads(out.read_text())
    assert other["strings"] == strings and torch.equal(torch.tensor(other["ids"]), ids)
    # the views are augmented: views of sentence 0 differ, and some view masks a word
    assert len({strings[0], strings[1], strings[2]}) >= 2
    assert any("[MASK]" in s for s in strings)
    # and the loader's ids are the tokenizer's ids of those strings
    pre = text_model(**TANG).make_preprocessor()
    first = pre.tokenizer(strings[0])["input_ids"]
    assert ids[0, : len(first)].tolist() == first
    # another seed gives other views
    assert text_views(workers=0, seed=7)[1] != strings


# --------------------------------------------------------------------------- the store


def store_builder(teacher, spec: StoreSpec) -> StoreBuilder:
    pre = teacher.make_preprocessor()
    return StoreBuilder(
        teacher,
        Sentences(),
        teacher_collate(pre, augmented=pre.randomized_in_training, seed=spec.seed),
        {"data": "sentences"},
        spec,
        augmented=pre.randomized_in_training,
        batch_size=4,
        device=torch.device("cpu"),
    )


def test_store_of_text_views_hits_on_rerun_and_misses_when_the_views_change(tmp_path) -> None:
    teacher = text_model("teacher", **TANG)
    spec = StoreSpec(views=4, seed=3)
    folder, seconds = open_or_build(tmp_path, store_builder(teacher, spec))
    assert seconds is not None
    again, seconds_again = open_or_build(tmp_path, store_builder(teacher, spec))
    assert again == folder and seconds_again is None  # a hit
    identity = json.loads((folder / "meta.json").read_text())["identity"]
    assert identity["preprocessing"]["settings"]["augment"]["mask_prob"] == 0.1
    # other augmentation settings: another entry
    changed = text_model("teacher", **{**TANG, "text__augment__mask_prob": 0.2})
    other, seconds_other = open_or_build(tmp_path, store_builder(changed, spec))
    assert other != folder and seconds_other is not None
    # view k of sentence i holds the teacher's logits on the replayed view k
    store = TeacherStore.open(folder)
    pre = teacher.make_preprocessor()
    keys = [(0, 0), (0, 3), (2, 1), (5, 2)]
    stored = store.lookup([f"sst:{i}" for i, _ in keys], [v for _, v in keys])
    for row, (index, view) in enumerate(keys):
        with replay_scope(3, f"sst:{index}", view):
            text = pre(SENTENCES[index], train=True)
        with torch.no_grad():
            live = teacher(pre.collate([text])).logits[0]
        torch.testing.assert_close(stored.logits[row], live, atol=1e-5, rtol=1e-4)
    assert not torch.equal(stored.logits[0], stored.logits[1])  # the views differ


def test_a_student_must_read_the_views_its_teacher_saw() -> None:
    teacher = text_model("teacher", **TANG)
    check_same_views({"teacher": teacher}, {"student": text_model(**TANG)})  # the same: fine
    with pytest.raises(ConfigError, match=r"student: its training views \(none\) differ from"):
        check_same_views({"teacher": teacher}, {"student": text_model()})
    other = text_model(**{**TANG, "text__augment__ngram_prob": 0.5})
    with pytest.raises(ConfigError, match="give both the same augmentation settings"):
        check_same_views({"teacher": teacher}, {"student": other})
    # an image student of a text teacher reads its own modality: not compared
    check_same_views({"teacher": teacher}, {"student": build_adapter(tiny_spec("image"))})


# --------------------------------------------------------------------------- unlabelled rows


def label_losses(**weights: float) -> DistillLoss:
    cfg = OmegaConf.structured(LossesCfg)
    for name, weight in weights.items():
        cfg[name].weight = weight
    return DistillLoss(cfg, 8, 8)


def test_ce_skips_unlabelled_rows_and_kd_uses_every_row() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    labels = torch.tensor([2, IGNORE_LABEL, 0, IGNORE_LABEL, 1])
    emb = torch.zeros(5, 8)
    loss = label_losses(ce=1.0, kd=1.0)
    terms = loss(emb, logits, emb, teacher, labels)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2, 4]], labels[[0, 2, 4]])
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    # an unlabelled row's logits change kd, not ce
    moved = logits.clone()
    moved[1] += torch.tensor([3.0, -1.0, 0.5])
    again = loss(emb, moved, emb, teacher, labels)
    assert again["ce"].item() == pytest.approx(terms["ce"].item(), rel=1e-6)
    assert again["kd"].item() != pytest.approx(terms["kd"].item(), rel=1e-3)
    # a batch of unlabelled rows only: ce is 0 (not NaN) and still backpropagates
    student = logits.clone().requires_grad_(True)
    none = torch.full((5,), IGNORE_LABEL)
    value = loss(emb, student, emb, teacher, none)["ce"]
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    # dkd splits on the true class: labelled rows only
    dkd = label_losses(dkd=1.0)
    full = dkd(emb, logits, emb, teacher, labels)["dkd"]
    part = dkd(emb, logits[[0, 2, 4]], emb, teacher[[0, 2, 4]], labels[[0, 2, 4]])["dkd"]
    assert full.item() == pytest.approx(part.item(), rel=1e-6)


def test_training_batches_mark_unlabelled_rows_and_evaluation_batches_do_not() -> None:
    pre = text_model().make_preprocessor()
    rows = [
        {"id": "a", "label": 1, "text": "a red circle"},
        {"id": "b", "label": None, "text": "a phrase"},
    ]
    train = RoleCollate({"student": pre}, train=True, keep_labels=True, num_classes=2)
    assert train(rows)["labels"].tolist() == [1, IGNORE_LABEL]
    assert train(rows[1:])["labels"].tolist() == [IGNORE_LABEL]
    evaluate = RoleCollate({"student": pre}, train=False, keep_labels=True, num_classes=2)
    assert "labels" not in evaluate(rows)
    assert evaluate(rows[:1])["labels"].tolist() == [1]
    no_classes = RoleCollate({"student": pre}, train=True, keep_labels=True, num_classes=0)
    assert "labels" not in no_classes(rows)


def write_csv(path, rows: list[tuple[str, str]]) -> str:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return str(path)


def test_transfer_rows_join_training_without_their_labels(tmp_path, data_cfg) -> None:
    from mmkd.data import build_splits

    train = write_csv(
        tmp_path / "train.csv", [(f"sentence {i}", "pos" if i % 2 else "neg") for i in range(10)]
    )
    # the transfer file's labels are never parsed: "banana" is no class and passes
    transfer = write_csv(
        tmp_path / "phrases.csv", [("a phrase", "banana"), ("another", "pos"), ("third", "")]
    )
    manifest = {"train": train, "transfer": transfer}
    splits = build_splits(data_cfg("manifest", manifest=manifest, val_fraction=0.2))
    assert splits.class_names == ["neg", "pos"]
    ids = [splits.train[i]["id"] for i in range(len(splits.train))]
    assert len(ids) == 8 + 3 and ids[-3:] == ["phrases.csv:2", "phrases.csv:3", "phrases.csv:4"]
    assert [splits.train[i]["label"] for i in range(8, 11)] == [None, None, None]
    assert all(splits.train[i]["label"] in (0, 1) for i in range(8))
    assert len(splits.val) == 2 and all(splits.val[i]["label"] is not None for i in range(2))
    assert splits.train.sample_id(9) == "phrases.csv:3"
    # a transfer row whose id repeats a training row's is named
    clash = tmp_path / "train.csv"
    with pytest.raises(DataError, match=r"data\.manifest\.transfer: sample id 'train\.csv:\d+'"):
        build_splits(
            data_cfg(
                "manifest", manifest={"train": train, "transfer": str(clash)}, val_fraction=0.2
            )
        )


# --------------------------------------------------------------------------- a whole run


def test_a_run_distils_stored_text_views_with_a_transfer_set_and_a_token_term(tmp_path) -> None:
    """The bilstm_kd_aug / small_transformer_kd shape on tiny models: K stored text views of
    labelled sentences plus unlabelled transfer rows, kd on every row, ce on the labelled ones,
    and a token-level term read from the store."""
    from tiny import small_run, tiny_overrides

    from mmkd.train import main

    sentences = [(s, "pos" if i % 2 else "neg") for i, s in enumerate(SENTENCES * 4)]
    train = write_csv(tmp_path / "train.csv", sentences)
    transfer = write_csv(tmp_path / "phrases.csv", [(s.split(",")[0], "") for s in SENTENCES])
    augment = ["text.augment.mask_prob=0.1", "text.augment.ngram_prob=0.25"]
    args = [
        *tiny_overrides("teacher", "text"),
        "teacher.head.classifier=true",
        *[f"teacher.{a}" for a in augment],
        *tiny_overrides("student", "text"),
        "student.head.classifier=true",
        *[f"student.{a}" for a in augment],
        "data.name=manifest",
        f"data.manifest.train={train}",
        f"data.manifest.transfer={transfer}",
        "data.val_fraction=0.25",
        "losses=text_tokens",
        "data.train_labels=true",
        "losses.token_cosine.pairs=[[tokens.2,tokens.2]]",
        "distill.store.views=2",
        f"distill.cache_dir={tmp_path / 'store'}",
        *small_run(epochs=2, demo=False),
        "trainer.log_every_n_steps=1",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert main(args) == 0
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for term in ("train/kd", "train/ce", "train/token_cosine"):
        assert term in header
    entries = {  # the store entries; the token cache (tokens/) lives beside them
        p.name: json.loads((p / "meta.json").read_text())
        for p in (tmp_path / "store").iterdir()
        if p.name != "tokens" and (p / "meta.json").is_file()
    }
    by_views = {meta["views"]: meta for meta in entries.values()}
    assert sorted(by_views) == [1, 2]  # val (1 view) and train (2 augmented views)
    assert by_views[2]["count"] == 18 + len(SENTENCES)  # 18 training sentences + the transfer rows
    assert by_views[2]["features"] == ["tokens.2"]
