"""Named batches: one type per task family, with the field names of NVIDIA's shards.

A batch travels from the loader to the model as one object: `batch.to(device)`, then
`model(**batch.model_inputs())`, which maps the shard names onto the model's argument names
(segment_ids -> token_type_ids, input_mask -> attention_mask) and adds the labels, so the
model returns its loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch

B = TypeVar("B", bound="Batch")


@dataclass
class Batch:
    """Tensors of one micro-batch, every one with the batch as its first dimension."""

    input_ids: torch.Tensor    # [B, n] WordPiece ids
    segment_ids: torch.Tensor  # [B, n] 0 = sentence A, 1 = sentence B
    input_mask: torch.Tensor   # [B, n] 1 = real token, 0 = padding

    def to(self: B, device: torch.device | str) -> B:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self: B) -> B:
        return self._map(torch.Tensor.pin_memory)

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def _map(self: B, fn) -> B:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def _encoder_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "token_type_ids": self.segment_ids, "attention_mask": self.input_mask}


@dataclass
class PretrainingBatch(Batch):
    """MLM + NSP: a shard's rows, with masked_lm_positions / masked_lm_ids expanded to labels."""

    masked_lm_labels: torch.Tensor      # [B, n] the original id at masked positions, -1 elsewhere
    next_sentence_labels: torch.Tensor  # [B] 1 = sentence B is a random one (NVIDIA's convention)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {**self._encoder_inputs(), "masked_lm_labels": self.masked_lm_labels,
                "next_sentence_labels": self.next_sentence_labels}


@dataclass
class ClassificationBatch(Batch):
    """GLUE: one label per sequence (a class index, or a float score for regression)."""

    labels: torch.Tensor  # [B] int64 class (-1 = unlabelled) or float32 score (nan = unlabelled)

    def model_inputs(self, with_labels: bool = True) -> dict[str, torch.Tensor]:
        inputs = self._encoder_inputs()
        return {**inputs, "labels": self.labels} if with_labels else inputs
