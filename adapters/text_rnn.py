"""text_rnn adapter: token embeddings + LSTM + pooling, the student of Tang et al. 2019.

The vocabulary is a transformers tokenizer's (so teacher and student can share it) and the
embeddings can start from a teacher's input-embedding matrix (`text_rnn.init_from`): no word
vectors need downloading. Padded positions are packed away, so a text's features do not depend
on the batch it is in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import ADAPTERS, Adapter, Batch, masked_mean
from .text import TextPreprocessor, make_text_augment
from .text_init import TEXT_ASSETS, load_source_model, load_source_tokenizer


class RnnEncoder(nn.Module):
    """input_ids, attention_mask -> token states (B, T, H·directions) and pooled (B, H·dirs)."""

    def __init__(
        self,
        embedding: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        pooling: str,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embedding.embedding_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.pooling = pooling
        self.out_dim = hidden_size * (2 if bidirectional else 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(input_ids))
        # no padding (batch 1, or texts of one length): packing would only cost time, about
        # 10 % of a batch-1 LSTM call, for the same result
        if bool(attention_mask.all()):
            tokens, (h_n, _) = self.lstm(embedded)
        else:
            lengths = attention_mask.sum(1).clamp_min(1).cpu()
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            states, (h_n, _) = self.lstm(packed)
            tokens, _ = pad_packed_sequence(
                states, batch_first=True, total_length=input_ids.shape[1]
            )
        mask = attention_mask[:, : tokens.shape[1]]
        if self.pooling == "last":  # final forward (and backward) states of the top layer
            directions = 2 if self.lstm.bidirectional else 1
            pooled = torch.cat(list(h_n[-directions:]), dim=-1)
        elif self.pooling == "mean":
            pooled = masked_mean(tokens, mask)
        else:
            filled = tokens.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
            pooled = filled.max(1).values
        return tokens, pooled


@ADAPTERS.register("text_rnn")
class TextRnnAdapter(Adapter):
    """Embedding + (Bi)LSTM + pooling over real tokens. Settings: `text_rnn`."""

    modality = "text"

    def build_encoder(self) -> tuple[nn.Module, int]:
        cfg = self.spec.text_rnn
        remote = cfg.trust_remote_code
        source = cfg.init_from or cfg.tokenizer
        field = f"text_rnn.{'init_from' if cfg.init_from else 'tokenizer'}"
        self.tokenizer = load_source_tokenizer(source, field, remote)
        pad = self.tokenizer.pad_token_id or 0
        if cfg.init_from:
            source_model = load_source_model(cfg.init_from, field, remote)
            weights = source_model.get_input_embeddings().weight.detach().clone()
            embedding = nn.Embedding.from_pretrained(
                weights, freeze=cfg.freeze_embeddings, padding_idx=pad
            )
            del source_model
        else:
            embedding = nn.Embedding(len(self.tokenizer), cfg.embedding_dim, padding_idx=pad)
            embedding.requires_grad_(not cfg.freeze_embeddings)
        self.spec.text_rnn.embedding_dim = embedding.embedding_dim  # what the export rebuilds
        encoder = RnnEncoder(
            embedding, cfg.hidden_size, cfg.num_layers, cfg.bidirectional, cfg.dropout, cfg.pooling
        )
        return encoder, encoder.out_dim

    def make_preprocessor(self) -> TextPreprocessor:
        cfg = self.spec.text_rnn
        augment = make_text_augment(cfg, self.tokenizer, f"{self.key}.text_rnn")
        return TextPreprocessor(self.tokenizer, cfg.max_length, augment)

    def encode(self, batch: Batch) -> Tensor:
        return self.encoder(batch["input_ids"], batch["attention_mask"])[1]

    def export_spec(self, folder: Path) -> DictConfig:
        """Save the tokenizer beside the weights so the export stands alone."""
        spec = super().export_spec(folder)
        self.tokenizer.save_pretrained(folder / TEXT_ASSETS)
        spec.text_rnn.tokenizer = TEXT_ASSETS  # relative to the export folder
        return spec

    def example_batch(self, batch_size: int = 1) -> Batch:
        length = min(16, self.spec.text_rnn.max_length)
        ids = torch.full((batch_size, length), self.tokenizer.unk_token_id or 1, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
