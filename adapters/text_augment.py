"""Text views for distillation (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT
into Simple Neural Networks", section 3.1): masking and n-gram sampling of a sentence's words.

Words are the whitespace-separated pieces of the text. Each word is replaced by the mask token
with probability `mask_prob`; then, with probability `ngram_prob`, only an n-gram of the words
is kept (n uniform in 1..ngram_max, its start uniform). With `keep_prob` a view is the original
text. Tang et al.'s third rule, POS-guided word swaps, needs a part-of-speech tagger, and none is
installable offline here, so it is left out.

Every draw comes from numpy's global (legacy) generator, whose stream numpy keeps stable across
releases, so inside `mmkd.replay.replay_scope(seed, sample id, view)` a view is a pure function of
those three values and the settings: the same string in every process, worker and run.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TextAugment:
    """A sentence -> one random view of it (the settings of `text.augment`)."""

    def __init__(
        self,
        mask_token: str,
        mask_prob: float = 0.0,
        ngram_prob: float = 0.0,
        ngram_max: int = 5,
        keep_prob: float = 0.0,
    ) -> None:
        self.mask_token = mask_token
        self.mask_prob = float(mask_prob)
        self.ngram_prob = float(ngram_prob)
        self.ngram_max = int(ngram_max)
        self.keep_prob = float(keep_prob)

    @property
    def enabled(self) -> bool:
        """Whether a view can differ from the text."""
        return (self.mask_prob > 0 or self.ngram_prob > 0) and self.keep_prob < 1

    def settings(self) -> dict[str, Any]:
        """Everything that fixes the view of a text for a given seed (keys the teacher store)."""
        return {
            "rules": "tang2019:mask,ngram",
            "mask_token": self.mask_token,
            "mask_prob": self.mask_prob,
            "ngram_prob": self.ngram_prob,
            "ngram_max": self.ngram_max,
            "keep_prob": self.keep_prob,
        }

    def __call__(self, text: str) -> str:
        rng = np.random  # the global generator: seeded by replay_scope
        if self.keep_prob > 0 and rng.random_sample() < self.keep_prob:
            return text
        words = text.split()
        if not words:
            return text
        changed = False
        if self.mask_prob > 0:
            masked = rng.random_sample(len(words)) < self.mask_prob
            if masked.any():
                words = [self.mask_token if m else w for w, m in zip(words, masked, strict=True)]
                changed = True
        if self.ngram_prob > 0 and rng.random_sample() < self.ngram_prob:
            n = min(int(rng.randint(1, self.ngram_max + 1)), len(words))
            start = int(rng.randint(0, len(words) - n + 1))
            words = words[start : start + n]
            changed = True
        return " ".join(words) if changed else text
