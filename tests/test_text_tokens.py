"""Token-level text terms (token_hint, token_cosine, attention_kl) against numpy references with
padding masks, the text adapter's token-level features, start-up checks (layer typos, token
positions that differ), and token features in the teacher store."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import term_loss, tiny_spec
from torch.utils.data import Dataset

from mmkd.adapters import build_adapter
from mmkd.config.schema import LossesCfg
from mmkd.errors import ConfigError
from mmkd.losses import (
    TERMS,
    FeatureTarget,
    TermInputs,
    attention_kl,
    token_cosine,
    token_mse,
)
from mmkd.store import StoreBuilder, StoreSpec, TeacherStore, open_or_build, teacher_collate

B, T = 3, 6
LENGTHS = [6, 4, 2]  # real tokens per row; the rest is padding


def mask() -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attention_probs(heads: int, seed: int) -> torch.Tensor:
    """Random self-attention probabilities (B, heads, T, T): each real query's row is a
    distribution over the real keys; padded rows and columns hold garbage."""
    scores = randn(B, heads, T, T, seed=seed)
    keys = mask()[:, None, None, :].bool()
    probs = torch.softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)
    garbage = randn(B, heads, T, T, seed=seed + 100).abs()
    real = keys & mask()[:, None, :, None].bool()
    return torch.where(real, probs, garbage)


def scramble_padding(x: torch.Tensor, seed: int, token_axes: tuple[int, ...]) -> torch.Tensor:
    """`x` with every value at a padded position (on any of `token_axes`) replaced."""
    pad = torch.zeros(x.shape, dtype=torch.bool)
    for axis in token_axes:
        shape = [1] * x.ndim
        shape[0], shape[axis] = B, T
        pad |= (mask() == 0).view(shape).expand(x.shape)
    return torch.where(pad, randn(*x.shape, seed=seed).abs(), x)


# --------------------------------------------------------------------------- numpy references


def mse_ref(s: np.ndarray, t: np.ndarray) -> float:
    rows = [((s[b, :n] - t[b, :n]) ** 2).mean(axis=-1) for b, n in enumerate(LENGTHS)]
    return float(np.concatenate(rows).mean())


def cosine_ref(s: np.ndarray, t: np.ndarray) -> float:
    values = []
    for b, n in enumerate(LENGTHS):
        for i in range(n):
            cos = s[b, i] @ t[b, i] / (np.linalg.norm(s[b, i]) * np.linalg.norm(t[b, i]))
            values.append(1 - cos)
    return float(np.mean(values))


def kl_ref(s: np.ndarray, t: np.ndarray) -> float:
    """MiniLM: mean over heads and real queries of sum over real keys t log(t / s)."""
    values = []
    for b, n in enumerate(LENGTHS):
        for h in range(s.shape[1]):
            for q in range(n):
                p, r = t[b, h, q, :n], s[b, h, q, :n]
                values.append(float((p * np.log(p / r)).sum()))
    return float(np.mean(values))


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def test_token_mse_and_cosine_match_numpy_over_real_tokens_only() -> None:
    s, t = randn(B, T, 8, seed=1), randn(B, T, 8, seed=2)
    assert token_mse(s, t, mask()).item() == pytest.approx(mse_ref(np64(s), np64(t)), rel=1e-5)
    assert token_cosine(s, t, mask()).item() == pytest.approx(
        cosine_ref(np64(s), np64(t)), rel=1e-5
    )
    # padded positions do not count: scrambling them on either side changes nothing
    s2, t2 = scramble_padding(s, 3, (1,)), scramble_padding(t, 4, (1,))
    assert not torch.equal(s, s2)
    assert token_mse(s2, t2, mask()).item() == pytest.approx(token_mse(s, t, mask()).item())
    assert token_cosine(s2, t2, mask()).item() == pytest.approx(token_cosine(s, t, mask()).item())
    # but a real token does
    s3 = s.clone()
    s3[2, 1] += 1.0
    assert token_mse(s3, t, mask()).item() != pytest.approx(token_mse(s, t, mask()).item())


def test_attention_kl_matches_numpy_minilm_formula_with_padding() -> None:
    s, t = attention_probs(4, seed=5), attention_probs(4, seed=6)
    got = attention_kl(s, t, mask()).item()
    assert got == pytest.approx(kl_ref(np64(s), np64(t)), rel=1e-5)
    assert attention_kl(t, t, mask()).item() == pytest.approx(0.0, abs=1e-6)
    # garbage in padded query rows and key columns changes nothing
    s2, t2 = scramble_padding(s, 7, (2, 3)), scramble_padding(t, 8, (2, 3))
    assert not torch.equal(s, s2)
    assert attention_kl(s2, t2, mask()).item() == pytest.approx(got, rel=1e-6)
    # zeros there (as the text adapter gives) give the same value and finite gradients
    zero = mask()[:, None, :, None] * mask()[:, None, None, :]
    s0 = (s * zero).requires_grad_(True)
    value = attention_kl(s0, t * zero, mask())
    assert value.item() == pytest.approx(got, rel=1e-6)
    value.backward()
    assert torch.isfinite(s0.grad).all()


def test_attention_kl_mean_heads_compares_head_averaged_distributions() -> None:
    s, t = attention_probs(2, seed=9), attention_probs(4, seed=10)
    got = attention_kl(s, t, mask(), heads="mean").item()
    ref = kl_ref(np64(s).mean(axis=1, keepdims=True), np64(t).mean(axis=1, keepdims=True))
    assert got == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------- on text models


@functools.cache
def cached_model(key: str, overrides: tuple[tuple[str, object], ...]):
    return build_adapter(tiny_spec("text", **dict(overrides)), key=key).eval()


def text_model(key: str = "student", **overrides):
    """A tiny text model, built once per settings in this module (none of the tests train it)."""
    return cached_model(key, tuple(sorted(overrides.items())))


def test_text_adapter_lists_and_returns_token_level_features() -> None:
    model = text_model()
    names = model.feature_names()
    for name in ("hidden_states.2", "tokens.0", "tokens.2", "attentions.1", "attention_mask"):
        assert name in names
    assert "attentions.2" not in names  # 2 layers: attentions.0 and .1
    shapes = model.feature_shapes(["tokens.2", "attentions.1", "attention_mask"])
    assert shapes == {"tokens.2": (16, 32), "attentions.1": (2, 16, 16), "attention_mask": (16,)}
    pre = model.make_preprocessor()
    texts = ["a red circle", "a much longer sentence about a blue square"]
    batch = pre.collate([pre(t, train=False) for t in texts])
    with torch.no_grad():
        out = model(batch, layers=["tokens.2", "attentions.1", "attention_mask"])
    real = batch["attention_mask"].sum(1)
    assert out.layers["attention_mask"].sum(1).tolist() == real.tolist()
    short = int(real[0])
    assert out.layers["tokens.2"][0, short:].abs().max() == 0  # zero past the mask
    attn = out.layers["attentions.1"]
    # each real query's row is a distribution over the real keys
    rows = attn[0, :, :short].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert attn[0, :, short:].abs().max() == 0 and attn[0, :, :, short:].abs().max() == 0


def test_a_text_alone_and_in_a_padded_batch_gives_the_same_token_loss() -> None:
    student, teacher = text_model(), text_model("teacher")
    loss = term_loss("token_cosine", [["tokens.2", "tokens.1"]], student, teacher)
    pre = student.make_preprocessor()

    def value(texts: list[str], pad_to: int | None) -> float:
        batch = pre.collate(texts)
        if pad_to:  # the same texts, padded further
            batch = dict(
                pre.tokenizer(texts, padding="max_length", max_length=pad_to, return_tensors="pt")
            )
            batch.pop("token_type_ids", None)
        with torch.no_grad():
            s = student(batch, layers=["tokens.2", "attention_mask"])
            t = teacher(batch, layers=["tokens.1"])
            return loss(
                s.embedding,
                None,
                t.embedding,
                None,
                None,
                student_layers=s.layers,
                teacher_features={"tokens.1": t.layers["tokens.1"]},
            )["token_cosine"].item()

    alone = value(["a red circle"], None)
    assert value(["a red circle"], 12) == pytest.approx(alone, rel=1e-5)


def test_token_terms_project_the_student_width_only_when_it_differs() -> None:
    student = text_model(**{"text__config_overrides__hidden_size": 16})
    teacher = text_model("teacher")
    hint = term_loss("token_hint", [["tokens.2", "tokens.2"]], student, teacher)
    projection = hint.terms["token_hint"].projections[0]
    assert isinstance(projection, torch.nn.Linear)
    assert (projection.in_features, projection.out_features) == (16, 32)
    same = term_loss("token_cosine", [["tokens.1", "tokens.2"]], text_model(), teacher)
    assert isinstance(same.terms["token_cosine"].projections[0], torch.nn.Identity)
    # the projection learns: a step lowers the loss on a fixed batch
    pre = student.make_preprocessor()
    batch = pre.collate(["a red circle", "two blue squares on a grey ground"])
    with torch.no_grad():
        s = student(batch, layers=["tokens.2", "attention_mask"]).layers
        t = {"tokens.2": teacher(batch, layers=["tokens.2"]).layers["tokens.2"]}
    optim = torch.optim.SGD(hint.parameters(), lr=0.5)
    values = []
    inputs = TermInputs(torch.zeros(2, 16), None, student_layers=s, teacher_features=t)
    for _ in range(5):
        value = hint.terms["token_hint"](inputs)
        optim.zero_grad()
        value.backward()
        optim.step()
        values.append(value.item())
    assert values[-1] < values[0]


def test_layer_typos_and_wrong_kinds_fail_at_start_up_naming_the_valid_layers() -> None:
    student, teacher = text_model(), text_model("teacher")
    with pytest.raises(ConfigError, match=r"no feature 'tokens\.3'; valid: .*tokens\.2"):
        term_loss("token_cosine", [["tokens.3", "tokens.2"]], student, teacher)
    with pytest.raises(ConfigError, match=r"teacher.*no feature 'attentions\.2'"):
        term_loss("attention_kl", [["attentions.1", "attentions.2"]], student, teacher)
    with pytest.raises(ConfigError, match=r"token_hint compares tokens\.N features"):
        term_loss("token_hint", [["hidden_states.2", "tokens.2"]], student, teacher)
    with pytest.raises(ConfigError, match=r"attention_kl compares attentions\.N"):
        term_loss("attention_kl", [["tokens.2", "tokens.2"]], student, teacher)
    cfg = OmegaConf.structured(LossesCfg)
    cfg.attention_kl.heads = "some"
    with pytest.raises(ConfigError, match=r"losses\.attention_kl\.heads: 'some' is not one of"):
        TERMS.get("attention_kl").check(cfg.attention_kl, "losses.attention_kl")


def test_attention_kl_heads_must_match_unless_averaged() -> None:
    student = text_model()  # 2 heads
    teacher = text_model("teacher", **{"text__config_overrides__num_attention_heads": 4})
    with pytest.raises(ConfigError, match=r"2 student and 4 teacher heads; .*heads=mean"):
        term_loss("attention_kl", [["attentions.1", "attentions.1"]], student, teacher)
    loss = term_loss(
        "attention_kl", [["attentions.1", "attentions.1"]], student, teacher, heads="mean"
    )
    assert "attention_kl" in loss.terms


def tiny_tokenizer(folder) -> str:
    """A WordPiece tokenizer of a dozen words, built and saved offline."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    # transformers 5 takes the vocabulary itself (it ignores a `vocab_file` argument)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    return str(folder)


def test_token_terms_need_the_same_tokenizer_and_max_length(tmp_path) -> None:
    student = text_model()
    other_length = text_model("teacher", **{"text__max_length": 12})
    with pytest.raises(
        ConfigError,
        match=r"student \(.*max_length 16\) and teacher \(.*max_length 12\).*max_length differ",
    ):
        term_loss("token_cosine", [["tokens.2", "tokens.2"]], student, other_length)
    other = text_model("teacher", **{"text__tokenizer": tiny_tokenizer(tmp_path)})
    with pytest.raises(ConfigError, match=rf"teacher \({tmp_path}.*tokenizer differ"):
        term_loss("token_cosine", [["tokens.2", "tokens.2"]], student, other)
    image = build_adapter(tiny_spec("image"), key="teacher")
    with pytest.raises(ConfigError):
        term_loss("token_cosine", [["tokens.2", "layer1"]], student, image)
    # a tokenizer saved elsewhere (an export) and reloaded is the same tokenizer
    folder = tmp_path / "saved"
    student.tokenizer.save_pretrained(folder)
    reloaded = text_model("teacher", **{"text__tokenizer": str(folder)})
    term_loss("token_cosine", [["tokens.2", "tokens.2"]], student, reloaded)


# --------------------------------------------------------------------------- the teacher store


class Sentences(Dataset):
    TEXTS = ("a red circle", "a blue square on the left", "two small circles", "one big square")

    def __len__(self) -> int:
        return len(self.TEXTS)

    def sample_id(self, index: int) -> str:
        return f"s{index}"

    def __getitem__(self, index: int) -> dict:
        return {"id": f"s{index}", "label": index % 2, "text": self.TEXTS[index]}


def test_token_features_are_stored_and_read_back_like_image_features(tmp_path) -> None:
    teacher = text_model("teacher")
    features = (FeatureTarget("tokens.2"), FeatureTarget("attentions.1"))
    spec = StoreSpec(features=features)
    collate = teacher_collate(teacher.make_preprocessor(), augmented=False, seed=0)
    data = Sentences()
    builder = StoreBuilder(
        teacher,
        data,
        collate,
        {"data": "sentences"},
        spec,
        augmented=False,
        batch_size=3,
        device=torch.device("cpu"),
    )
    folder, seconds = open_or_build(tmp_path, builder)
    assert seconds is not None
    store = TeacherStore.open(folder)
    # fixed shapes, padded to max_length 16: 16 x 32 + 2 x 16 x 16 float32 per row
    assert store.arrays["feature.0"].shape == (4, 1, 16, 32)
    assert store.arrays["feature.1"].shape == (4, 1, 2, 16, 16)
    row_bytes = sum(store.arrays[f"feature.{i}"][0].nbytes for i in range(2))
    assert row_bytes == (16 * 32 + 2 * 16 * 16) * 4
    # each row equals the teacher's features on that text alone (batched with others to build)
    pre = teacher.make_preprocessor()
    stored = store.lookup(["s2", "s0"])
    with torch.no_grad():
        out = teacher(pre.collate(["two small circles"]), layers=["tokens.2", "attentions.1"])
    torch.testing.assert_close(
        stored.features["tokens.2"][0], out.layers["tokens.2"][0], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        stored.features["attentions.1"][0], out.layers["attentions.1"][0], atol=1e-5, rtol=1e-4
    )


def test_mmkd_layers_lists_the_token_level_names_the_terms_take(capsys) -> None:
    from tiny import tiny_overrides

    from mmkd.cli import main

    args = ["layers", "teacher=none", "losses=supervised", "data.train_labels=true"]
    assert main([*args, *tiny_overrides("student", "text")]) == 0
    out = capsys.readouterr().out
    assert "student (text): 9 layers" in out
    for name, shape in [("tokens.2", "(16, 32)"), ("attentions.1", "(2, 16, 16)")]:
        assert any(line.split() == [name, *shape.split()] for line in out.splitlines()), name


def test_text_preprocessing_is_keyed_by_the_tokenizer_not_its_folder(tmp_path) -> None:
    """The same tokenizer saved in two folders gives one preprocessing identity (the teacher
    store's key; a BiLSTM initialised from a teacher's folder shares its stored views), and
    another vocabulary gives another."""
    from transformers import AutoTokenizer, BertTokenizerFast

    from mmkd.adapters.text import TextPreprocessor

    (tmp_path / "a").mkdir()
    first = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path / "a"))
    first.save_pretrained(tmp_path / "b")
    second = AutoTokenizer.from_pretrained(tmp_path / "b")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "green"]
    other = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    same = TextPreprocessor(first, 16).identity(), TextPreprocessor(second, 16).identity()
    assert same[0] == same[1]
    assert TextPreprocessor(other, 16).identity() != same[0]
    assert TextPreprocessor(first, 12).identity() != same[0]
