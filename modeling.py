"""BERT with a pluggable per-layer sparse attention mask (SparseBERT).

Module and parameter names follow NVIDIA's DeepLearningExamples BERT so its checkpoints load as
they are (`dense_act` for the intermediate / pooler / MLM-transform linears, tied MLM decoder,
separate `cls.predictions.bias`). Hugging Face BERT weights load through a name mapping.

Padding and the sparse mask (see `attention_masks.py`) are both additive biases on the scores: 0
where a key is kept, -10000 where it is dropped, as NVIDIA's BERT and the SparseBERT code do.
Because the bias is finite, a query row whose every key is dropped never turns into NaN: all its
scores move by the same -10000, so it attends, as if unmasked, over its non-padded keys.
`sparse_attention.py` prepares each layer's attention once per forward pass and picks the kernels:
SDPA (cuDNN / flash / memory-efficient) by default, FlexAttention for the DAM search without
attention dropout and for long block-sparse masks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import attention_masks
import checkpoints
import sparse_attention
from sparse_attention import LayerAttention
from atomic_io import atomic_path, atomic_write_text
from utils import describe_json_value

logger = logging.getLogger(__name__)

MASK_TYPES = attention_masks.MASK_TYPES
CONFIG_NAMES = ("bert_config.json", "config.json")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
MASK_FILE = "attention_mask.safetensors"  # a saved model folder's own copy of a mask file
# The config fields that decide the weights' shapes or what they compute: a checkpoint written
# under other values holds another model, even where every shape agrees (e.g. heads, hidden_act).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act")

ACT2FN = {
    "gelu": F.gelu,  # exact erf GELU, as the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
}

# Unknown keys a user must hear about: those that look like a mask field
# (attention_masks.MASK_FIELD_PREFIXES), or that are within MAX_TYPO_DISTANCE edits of any field
# (a typo would otherwise silently leave the default in place). Other unknown keys (e.g. a Hugging
# Face config.json's extras) are kept.
MAX_TYPO_DISTANCE = 2
# Hugging Face fields we keep in `extra` but whose only value we implement.
IMPLEMENTED_HF_VALUES = {"position_embedding_type": "absolute"}
# Bounds checked before any allocation: beyond them a model only fails later with an allocator
# traceback. 2**24 is far above any BERT dimension (vocabularies of 250k, 8k positions).
MAX_DIMENSION = 2**24
MAX_PARAMETERS = 10**11


# ============================================================================ config


@dataclass
class BertConfig(attention_masks.MaskConfig):
    """BERT's fields, each a flat key of bert_config.json. The attention-mask fields, and the
    num_hidden_layers and num_attention_heads its grid covers, are inherited from MaskConfig,
    which declares and validates them."""

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # Which kernels attention runs on (sparse_attention.BACKENDS): "auto" picks per call.
    attention_backend: str = "auto"
    # Keys we do not use but keep for a faithful round trip (e.g. HF's "model_type").
    extra: dict = field(default_factory=dict, repr=False)

    # -- validation (the field types: MaskConfig._check_types): every error names the field and what is allowed

    def _check_sizes(self) -> None:
        for name in _DIMENSIONS:
            if getattr(self, name) > MAX_DIMENSION:
                raise ValueError(f"bert_config: field '{name}' is {getattr(self, name)}, above {MAX_DIMENSION} "
                                 f"(no BERT dimension is that large); fix '{name}'")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ValueError(
                f"bert_config: the model would have {self.parameter_count():.3g} parameters (limit "
                f"{MAX_PARAMETERS:.0e}); lower 'num_hidden_layers' ({self.num_hidden_layers}), 'hidden_size' "
                f"({self.hidden_size}), 'intermediate_size' ({self.intermediate_size}) or 'vocab_size' "
                f"({self.vocab_size})")

    def _check_extra(self) -> None:
        for name, implemented in IMPLEMENTED_HF_VALUES.items():
            value = self.extra.get(name, implemented)
            if value != implemented:
                raise ValueError(f"bert_config: field '{name}' is {describe_json_value(value)}; only "
                                 f"{implemented!r} is implemented: remove the field or set it to {implemented!r}")

    def _check_values(self) -> None:
        super()._check_values()  # the mask's fields
        for name in _DIMENSIONS:
            if getattr(self, name) <= 0:
                raise ValueError(f"bert_config field '{name}' must be > 0, got {getattr(self, name)}")
        self._check_sizes()
        self._check_extra()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"bert_config field 'num_attention_heads' ({self.num_attention_heads}) must divide "
                f"'hidden_size' ({self.hidden_size})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"bert_config field '{name}' must be in [0, 1), got {getattr(self, name)}")
        self._check_choice("hidden_act", tuple(ACT2FN))
        self._check_choice("attention_backend", sparse_attention.BACKENDS)
        if self.attention_backend == "flex" and self.attention_probs_dropout_prob > 0:
            raise ValueError("bert_config: attention_backend 'flex' has no attention dropout; set "
                             "'attention_probs_dropout_prob' to 0 or use attention_backend 'auto'")
        if self.attention_mask_type != "dense" and self.mask_seq_length > self.max_position_embeddings:
            raise ValueError(
                f"bert_config field 'mask_seq_length' ({self.mask_seq_length}) must be <= "
                f"'max_position_embeddings' ({self.max_position_embeddings})"
            )

    # -- (de)serialisation (from_json_file, from_checkpoint and replace: MaskConfig's)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BertConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = data.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"bert_config field 'extra' must be a JSON object, got {extra!r}")
        kwargs, extra = {}, dict(extra)
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key != "extra":
                _refuse_likely_typo(key, known)
                extra[key] = value
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data.update(self.extra)
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json_string())

    def parameter_count(self) -> int:
        """Parameters of the embeddings and the encoder layers (the heads add little)."""
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.padded_vocab_size + self.max_position_embeddings + self.type_vocab_size + 2) * h
        attention = 4 * (h * h + h) + 2 * h  # Q, K, V, output projections and their LayerNorm
        feed_forward = 2 * h * i + i + h + 2 * h
        return embeddings + self.num_hidden_layers * (attention + feed_forward)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: the vocab padded to a multiple of 8 (tensor-core friendly, as NVIDIA)."""
        return math.ceil(self.vocab_size / 8) * 8

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


# BERT's own sizes (the mask's grid, num_hidden_layers / num_attention_heads included, is MaskConfig's to check)
_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "type_vocab_size")


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (char_a != char_b))
    return row[-1]


def _refuse_likely_typo(key: str, known: set[str]) -> None:
    """Raise for an unknown key that is probably a misspelt field: one that looks like a mask field,
    or is within MAX_TYPO_DISTANCE edits of any field."""
    attention_masks.refuse_unknown_mask_field(key)
    distance, nearest = min((_edit_distance(key, name), name) for name in known)
    if distance <= MAX_TYPO_DISTANCE:
        raise ValueError(f"bert_config: unknown field '{key}'; did you mean '{nearest}'? Rename it")


# ============================================================================ modules


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that keeps the residual stream in the compute dtype under autocast.

    Autocast runs layer_norm in fp32 and returns fp32, so every residual add and every saved
    activation after it would be fp32 (what HF BERT does). NVIDIA's half-precision recipes (amp O2,
    or the `.half()` model of --allreduce_post_accumulation_fp16) keep the stream in half; so do
    we: the kernel still accumulates its statistics in fp32, and the memory-bound LayerNorm /
    dropout / residual kernels read and write the stream at half the width. Without autocast this
    is plain LayerNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if dtype == self.weight.dtype:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                                self.eps)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, attend: LayerAttention) -> torch.Tensor:
        batch, seq_len, width = hidden.shape
        # One GEMM for Q, K and V: the weights are concatenated per call (a small copy next to the
        # GEMM), so the checkpoint keeps NVIDIA's separate query / key / value tensors.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(hidden, weight, bias).view(batch, seq_len, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, n, d]
        context = attend(q, k, v, self.dropout_p if self.training else 0.0)
        return context.transpose(1, 2).reshape(batch, seq_len, width)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, attend: LayerAttention) -> torch.Tensor:
        return self.output(self.self(hidden, attend), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense_act(hidden))


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, attend: LayerAttention) -> torch.Tensor:
        attended = self.attention(hidden, attend)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.checkpoint_activations = False

    def forward(self, hidden: torch.Tensor, attends: list[LayerAttention]) -> torch.Tensor:
        """``attends``: one per layer, or one shared by all (a mask shared across layers, or none)."""
        for index, layer in enumerate(self.layer):
            attend = attends[index % len(attends)]
            if self.checkpoint_activations and self.training:
                hidden = checkpoint(layer, hidden, attend, use_reentrant=False)
            else:
                hidden = layer(hidden, attend)
        return hidden


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense_act(hidden[:, 0]))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense_act(hidden)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The bias inside the GEMM (its epilogue) rather than one more pass over the [rows, vocab] scores.
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


# ============================================================================ outputs


@dataclass(kw_only=True)
class ModelOutput:
    """What a task model returns, by name. Given its labels, `loss` is the total the optimizer
    minimises: the task's loss terms (named by each output) plus `mask_penalty` (λ·ΣM of the mask
    sampled in this forward pass, or a target search's Lagrangian; 0 without a learnable mask).
    Without labels every loss is None.

    Iterating yields the scores in NVIDIA's order (`SCORES`), so a caller written for NVIDIA's
    tuples keeps working: `prediction_scores, seq_relationship_score = model(...)`.
    """

    SCORES: ClassVar[tuple[str, ...]] = ()
    LOSSES: ClassVar[tuple[str, ...]] = ("loss", "mask_penalty")

    loss: torch.Tensor | None = None
    mask_penalty: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (getattr(self, name) for name in self.SCORES)

    def losses(self) -> dict[str, torch.Tensor]:
        """`loss` and each of its named terms (fp32 scalars), in `LOSSES` order; empty without labels."""
        return {name: getattr(self, name) for name in self.LOSSES if getattr(self, name) is not None}


@dataclass(kw_only=True)
class PreTrainingOutput(ModelOutput):
    """MLM + NSP: `loss` = `mlm_loss` + `nsp_loss` + `mask_penalty`. With masked_lm_labels,
    `prediction_scores` holds only the scored rows (`masked_lm_rows`) and `masked_lm_targets` their
    labels (-1: a filler row), so `masked_lm_token_losses()` gives each row's cross-entropy."""

    SCORES: ClassVar[tuple[str, ...]] = ("prediction_scores", "seq_relationship_score")
    LOSSES: ClassVar[tuple[str, ...]] = ("loss", "mlm_loss", "nsp_loss", "mask_penalty")

    prediction_scores: torch.Tensor
    seq_relationship_score: torch.Tensor
    masked_lm_targets: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None

    def masked_lm_token_losses(self) -> torch.Tensor:
        """Float32[rows]: the MLM cross-entropy of each scored row (0 for a filler row), whose mean
        over the masked rows is `mlm_loss`; needs masked_lm_labels."""
        if self.masked_lm_targets is None:
            raise ValueError("per-token MLM losses need the forward pass's masked_lm_labels")
        return masked_lm_loss(self.prediction_scores, self.masked_lm_targets, reduction="none")


@dataclass(kw_only=True)
class LogitsOutput(ModelOutput):
    """One head's scores (a sequence or token classifier, the MLM or NSP head alone), and with labels
    `loss` = the task's loss + `mask_penalty`."""

    SCORES: ClassVar[tuple[str, ...]] = ("logits",)

    logits: torch.Tensor


@dataclass(kw_only=True)
class QuestionAnsweringOutput(ModelOutput):
    """SQuAD's start and end logits per token; with both positions, `loss` = their mean
    cross-entropy + `mask_penalty`."""

    SCORES: ClassVar[tuple[str, ...]] = ("start_logits", "end_logits")

    start_logits: torch.Tensor
    end_logits: torch.Tensor


# ============================================================================ models


@dataclass
class LoadReport:
    """What `from_pretrained` could not match; empty lists mean an exact load."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    source: str


def log_load_report(report: LoadReport) -> None:
    """Heads missing or left over (MLM / NSP heads absent from an encoder-only checkpoint, a new
    classifier, a pretraining checkpoint's heads under a classifier) are what a warm start expects:
    INFO. Encoder weights (`bert.*`) missing or left over mean the wrong checkpoint: WARNING."""
    if not (report.missing_keys or report.unexpected_keys):
        return
    in_encoder = any(k.startswith("bert.") for k in report.missing_keys + report.unexpected_keys)
    level = logging.WARNING if in_encoder else logging.INFO
    logger.log(level, "%s: missing keys %s; unexpected keys %s%s", report.source, report.missing_keys,
               report.unexpected_keys, "" if in_encoder else " (task heads only: they start from fresh weights)")


class BertPreTrainedModel(nn.Module):
    """Weight init, mask access and checkpoint I/O shared by every BERT model class."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.load_report: LoadReport | None = None

    def init_weights(self) -> None:
        # Every Linear / Embedding, the three `dense_act` layers included (NVIDIA's code skipped
        # them by accident and left them at PyTorch's default init).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def bert_model(self) -> "BertModel":
        return self if isinstance(self, BertModel) else self.bert

    def mask_parameters(self) -> list[nn.Parameter]:
        """The learnable attention-mask logits (their own optimizer group: no decay, no trust ratio)."""
        mask = self.bert_model.sparse_mask
        return [p for p in mask.parameters() if p.requires_grad] if mask is not None else []

    def mask_sparsity(self, seq_len: int | None = None) -> float:
        """Sparsity (fraction of dropped pairs) of the mask used at evaluation (1[σ(a) > 0.5] for DAM):
        of its top-left `seq_len` x `seq_len` slice, which inputs of that length use (default: all of
        mask_seq_length); 0 for dense attention."""
        mask = self.bert_model.sparse_mask
        if mask is None:
            return 0.0
        n = mask.seq_len if seq_len is None else seq_len
        if not 1 <= n <= mask.seq_len:
            raise ValueError(f"cannot measure the mask at length {n}: it covers 1 to {mask.seq_len} tokens")
        return attention_masks.sparsity(mask.binarize()[..., :n, :n])

    def _losses(self, task_loss: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """An output's `loss` and `mask_penalty` for this forward pass's task loss ({} without one)."""
        if task_loss is None:
            return {}
        penalty = self._mask_penalty()
        return {"loss": task_loss + penalty, "mask_penalty": penalty}

    def _mask_penalty(self) -> torch.Tensor:
        """λ·ΣM of the mask sampled in the last forward pass (or a target search's Lagrangian), in fp32;
        0 without a learnable mask (dense, a pattern, a mask file, a frozen search)."""
        mask = self.bert_model.sparse_mask
        if mask is None or not self.mask_parameters():
            return torch.zeros((), device=self.bert_model.embeddings.word_embeddings.weight.device)
        return mask.penalty()

    def set_checkpoint_activations(self, enabled: bool) -> None:
        self.bert_model.encoder.checkpoint_activations = enabled

    # -- checkpoint I/O

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: BertConfig | None = None, **model_kwargs: Any):
        """Build the model and load NVIDIA / this project's / Hugging Face weights into it.

        `path` is an NVIDIA checkpoint (`{"model": state_dict}`), a bare state-dict file, a
        `.safetensors` file, or a folder holding `model.safetensors` / `pytorch_model.bin`. Without
        `config`, `bert_config.json` or `config.json` next to the weights is read.
        """
        weights_file = resolve_weights_file(path)
        if config is None:
            config = find_config_beside(weights_file)
        model = cls(config, **model_kwargs)
        state_dict = read_state_dict(weights_file)
        model.load_report = model.load_converted_state_dict(state_dict, source=str(weights_file))
        return model

    def load_converted_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict",
                                  strict: bool = False) -> LoadReport:
        """Map foreign names onto ours, check shapes, load, and report what did not match.

        `strict` (a resume) refuses, before loading anything, a state dict that lacks any of this
        model's tensors (mask logits included) or holds others: a resume is never partial. Otherwise a
        target search's state (`attention_masks.SEARCH_STATE_NAMES`) this model lacks is left out
        unreported: a fine-tuned or λ-searched mask has no multipliers.
        """
        own = self.state_dict()
        converted = convert_state_dict(state_dict, own_keys=own.keys(), vocab_size=self.config.vocab_size)
        mismatch = _shape_mismatch(own, converted)
        if mismatch:
            raise ValueError(f"{source}: {mismatch}; the checkpoint is for another architecture — use its own "
                             f"bert_config.json")
        if not strict:  # a target search's state means nothing to a model that searches nothing
            converted = {k: v for k, v in converted.items() if k in own or not attention_masks.is_search_state(k)}
        # The tied decoder weight is restored through the embeddings.
        missing = [k for k in own if k not in converted and not k.endswith("decoder.weight")]
        unexpected = [k for k in converted if k not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"{source} does not hold this model's weights (missing {len(missing)} keys "
                             f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}) and a resume never "
                             f"loads part of a model: resume with the config it was written with, or use "
                             f"another --output_dir")
        self.load_state_dict(converted, strict=False)
        # Mask logits absent from a plain BERT checkpoint start fresh, as intended.
        missing = [k for k in missing if not attention_masks.is_mask_state(k)]
        report = LoadReport(missing, unexpected, source)
        log_load_report(report)
        return report

    def save_pretrained(self, directory: str | os.PathLike, hf_format: bool = False) -> Path:
        """Write `model.safetensors` + config (ours: `bert_config.json`; HF: `config.json`).

        With `hf_format` the names, vocab rows and config follow Hugging Face's BERT, so
        `transformers` loads the folder directly.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.endswith("cls.predictions.decoder.weight")}  # tied: stored once
        if hf_format:
            if self.config.attention_mask_type != "dense":
                logger.warning("%s: transformers' BERT has no sparse attention mask and attends densely; "
                               "this project's from_pretrained restores the '%s' mask", directory,
                               self.config.attention_mask_type)
            state = to_hf_state_dict(state, self.config.vocab_size)
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        config = save_mask_into_folder(self.config, self.bert_model.sparse_mask, directory)
        if hf_format:
            # transformers keeps the fields it does not know, so our mask fields ride along in config.json.
            hf_config = {**config.to_dict(), "model_type": "bert", "architectures": [type(self).__name__]}
            atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2, sort_keys=True))
        else:
            config.to_json_file(directory / "bert_config.json")
        return directory


class BertModel(BertPreTrainedModel):
    """Embeddings → encoder (with the sparse mask in every layer) → pooler."""

    def __init__(self, config: BertConfig, mask_logits_from_checkpoint: bool = False) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        # The mask initialises its own logits (N(0, dam_init_std)); init_weights leaves it alone.
        # Logits a checkpoint will overwrite are drawn from a copy of the RNG state, so every weight
        # drawn after them, and every later random number, is the same whatever the mask.
        with torch.random.fork_rng(devices=[], enabled=mask_logits_from_checkpoint):
            self.sparse_mask = attention_masks.build_attention_mask(config)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        hidden = self.encoder(hidden, self.layer_attentions(attention_mask, input_ids.size(1), hidden))
        return hidden, self.pooler(hidden)

    def layer_attentions(self, attention_mask: torch.Tensor | None, seq_len: int,
                         hidden: torch.Tensor) -> list[LayerAttention]:
        """Each layer's attention (padding + its sparse mask), built once per forward pass."""
        key_padding = None if attention_mask is None else attention_mask == 0
        keep = None if self.sparse_mask is None else self.sparse_mask(seq_len)  # [L or 1, H or 1, n, n]
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        return sparse_attention.prepare_layers(keep, key_padding, device=hidden.device, dtype=_compute_dtype(hidden),
                                               dropout_p=dropout_p, backend=self.config.attention_backend)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on (SDPA needs the bias to match)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def masked_lm_rows(masked_lm_labels: torch.Tensor, max_predictions: int | None = None) -> torch.Tensor:
    """Indices into the flattened [B * n] tokens of the rows the MLM head scores (label -1 = unmasked).

    Without ``max_predictions``: exactly the masked rows, whose number depends on the data (one
    host sync). With it (an upper bound on masked tokens per sequence, e.g. the shards' validated
    --max_predictions_per_seq): B * max_predictions rows, each sequence's masked positions first
    in position order, then unmasked filler rows whose label -1 the loss ignores. That shape is
    static: no sync, nothing for torch.compile to recompile.
    """
    if max_predictions is None:
        return (masked_lm_labels.reshape(-1) != -1).nonzero().squeeze(1)
    batch, seq_len = masked_lm_labels.shape
    masked_first = torch.argsort((masked_lm_labels == -1).to(torch.int8), dim=1, stable=True)
    rows = masked_first[:, :min(max_predictions, seq_len)]
    return (rows + torch.arange(batch, device=rows.device)[:, None] * seq_len).reshape(-1)


def masked_lm_loss(prediction_scores: torch.Tensor, row_labels: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """MLM cross-entropy over the scored rows (label -1 ignored), in fp32 (NVIDIA's criterion)."""
    return F.cross_entropy(prediction_scores.float(), row_labels, ignore_index=-1, reduction=reduction)


class BertForPreTraining(BertPreTrainedModel):
    """MLM + NSP heads (a `PreTrainingOutput`). With `masked_lm_labels` the vocab projection runs only
    on the rows of `masked_lm_rows`; with `next_sentence_labels` too, the losses, each named: MLM,
    NSP and the attention-mask penalty (the search's own term, kept apart from the language-model
    loss it is traded against), and their sum `loss`.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                masked_lm_labels: torch.Tensor | None = None,
                next_sentence_labels: torch.Tensor | None = None,
                max_predictions: int | None = None) -> PreTrainingOutput:
        sequence_output, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        seq_relationship_score = self.cls.seq_relationship(pooled_output)
        if masked_lm_labels is None:
            return PreTrainingOutput(prediction_scores=self.cls.predictions(sequence_output),
                                     seq_relationship_score=seq_relationship_score)
        rows = masked_lm_rows(masked_lm_labels, max_predictions)
        prediction_scores = self.cls.predictions(sequence_output.flatten(0, 1)[rows])  # [rows, vocab]
        targets = masked_lm_labels.reshape(-1)[rows]
        losses = {}
        if next_sentence_labels is not None:
            mlm_loss = masked_lm_loss(prediction_scores, targets)
            nsp_loss = F.cross_entropy(seq_relationship_score.float(), next_sentence_labels.view(-1))
            losses = {"mlm_loss": mlm_loss, "nsp_loss": nsp_loss, **self._losses(mlm_loss + nsp_loss)}
        return PreTrainingOutput(prediction_scores=prediction_scores, seq_relationship_score=seq_relationship_score,
                                 masked_lm_targets=targets, **losses)


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> LogitsOutput:
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        return LogitsOutput(logits=self.cls.predictions(sequence_output))


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> LogitsOutput:
        _, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        return LogitsOutput(logits=self.cls.seq_relationship(pooled_output))


class _BertWithClassifier(BertPreTrainedModel):
    """BERT + dropout + a linear classifier: the shape shared by the sequence and token heads."""

    def __init__(self, config: BertConfig, num_labels: int = 2, mask_logits_from_checkpoint: bool = False) -> None:
        super().__init__(config)
        self.num_labels = num_labels
        self.bert = BertModel(config, mask_logits_from_checkpoint)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def _classified(self, logits: torch.Tensor, labels: torch.Tensor | None) -> LogitsOutput:
        """The classifier's output: its logits, and given `labels` its losses."""
        task_loss = None if labels is None else classification_loss(logits, labels)
        return LogitsOutput(logits=logits, **self._losses(task_loss))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes (label -1 ignored), or mean squared error for one output
    (regression, nan ignored), in fp32."""
    if logits.size(-1) == 1:
        scores, targets = logits.float().view(-1), labels.float().view(-1)
        labelled = ~torch.isnan(targets)
        return F.mse_loss(scores[labelled], targets[labelled])
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-1)


class BertForSequenceClassification(_BertWithClassifier):
    """Classifier on the pooled [CLS] vector (num_labels = 1: regression); with `labels`, also the loss."""

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LogitsOutput:
        _, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        return self._classified(self.classifier(self.dropout(pooled_output)), labels)


class BertForTokenClassification(_BertWithClassifier):
    """Classifier on every token's vector; with `labels` ([B, n], -1 ignored), also the loss."""

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LogitsOutput:
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        return self._classified(self.classifier(self.dropout(sequence_output)), labels)


class BertForQuestionAnswering(BertPreTrainedModel):
    """SQuAD head: start and end logits per token; with both positions, also their mean cross-entropy."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        start_logits, end_logits = (t.squeeze(-1) for t in self.qa_outputs(sequence_output).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start_logits.float(), start_positions)
                    + F.cross_entropy(end_logits.float(), end_positions)) / 2
        return QuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits, **self._losses(loss))


# ============================================================================ weight files and names


def resolve_weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no {' or '.join(WEIGHT_NAMES)}: point at a checkpoint file or a model folder")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check --init_checkpoint / the model path")
    return path


def config_file_beside(weights_file: Path) -> Path | None:
    """The model folder's own config: the first of CONFIG_NAMES next to `weights_file`."""
    for name in CONFIG_NAMES:
        candidate = weights_file.parent / name
        if candidate.is_file():
            return candidate
    return None


def find_config_beside(weights_file: Path) -> BertConfig:
    """The config next to `weights_file`, its relative attention_mask_file taken from that folder."""
    config_file = config_file_beside(weights_file)
    if config_file is None:
        raise FileNotFoundError(
            f"no {' or '.join(CONFIG_NAMES)} next to {weights_file}: pass the config explicitly (--config_file)"
        )
    return mask_file_from_folder(BertConfig.from_json_file(config_file), weights_file.parent)


def mask_file_from_folder(config: BertConfig, folder: Path) -> BertConfig:
    """`config` with a relative attention_mask_file resolved against the model folder it was saved in.

    A saved model folder names its mask relative to itself, so it loads the same from any directory.
    """
    mask_file = config.attention_mask_file
    if not mask_file or Path(mask_file).is_absolute():
        return config
    return config.replace(attention_mask_file=str(folder / mask_file))


def save_mask_into_folder(config: BertConfig, mask: attention_masks.AttentionMask | None,
                          directory: Path) -> BertConfig:
    """The config to write into the model folder `directory`, saving a mask that comes from a file there.

    The copy is named relative to the folder (`mask_file_from_folder` resolves it on load), so the
    folder loads the same from any directory, even once the source file is gone. Other masks live
    in the config (patterns) or the weights (DAM logits): the config comes back unchanged.
    """
    if config.attention_mask_type != "file":
        return config
    metadata = mask.describe()
    # The mask in use (the source file may have changed since), in its stored shape, with the
    # mode the source file recorded, so a reload reports the same provenance.
    attention_masks.save_mask_file(directory / MASK_FILE, mask.binarize(),
                                   {**metadata, "mode": metadata.get("source_mode")})
    return config.replace(attention_mask_file=MASK_FILE)


def read_state_dict(weights_file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch file loaded with weights_only (never unpickled)."""
    return _read_weights(weights_file)[0]


def read_checkpoint(weights_file: Path) -> tuple[dict[str, torch.Tensor], BertConfig | None]:
    """`read_state_dict`, plus the config the checkpoint records (run_pretraining.py's do, under
    "config"), or None (NVIDIA's, Hugging Face's, a bare state dict), from one read of the file."""
    state, checkpoint = _read_weights(weights_file)
    return state, recorded_config(checkpoint, str(weights_file))


def _read_weights(weights_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict, and the checkpoint dict around it ({} when the file is the state dict itself)."""
    if weights_file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_file)), {}
        except SafetensorError as err:
            raise ValueError(f"{weights_file} is not a valid safetensors file: {err}") from None
    obj = checkpoint = checkpoints.safe_torch_load(weights_file)
    if isinstance(obj, dict) and isinstance(obj.get(checkpoints.MODEL), dict):
        obj = obj[checkpoints.MODEL]  # NVIDIA checkpoint / fine-tuning output
    else:
        checkpoint = {}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{weights_file} is not a state dict (name → tensor) nor an NVIDIA checkpoint with 'model'")
    return obj, checkpoint


def read_warm_start(path: str | os.PathLike,
                    model: BertPreTrainedModel) -> tuple[dict[str, torch.Tensor], BertConfig | None]:
    """The weights at `path` (a file or a model folder) for warm-starting `model`, checked to be an
    encoder of its architecture (`check_warm_start`), and the config they were written under
    (`read_warm_start_weights`). A model with fewer layers than the checkpoint gets its first layers."""
    state, recorded = read_warm_start_weights(path)
    return check_warm_start(model, state, str(path), recorded), recorded


def read_warm_start_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], BertConfig | None]:
    """The weights at `path` (a file or a model folder), unchecked, and the config they were written
    under: the checkpoint's recorded one, else a folder's own config file, else None. For a caller
    whose model depends on that config (run_glue freezes the mask by the search's rule)."""
    weights_file = resolve_weights_file(path)
    state, recorded = read_checkpoint(weights_file)
    config_file = config_file_beside(weights_file) if Path(path).is_dir() else None
    if recorded is None and config_file is not None:
        recorded = BertConfig.from_json_file(config_file)
    return state, recorded


def check_warm_start(model: BertPreTrainedModel, state: dict[str, torch.Tensor], source: str,
                     recorded: BertConfig | None) -> dict[str, torch.Tensor]:
    """`state` to load into `model`: the checkpoint's first layers when the model is shallower
    (`_first_layers`), after refusing (`_refuse_another_architecture`) weights that would leave the
    encoder random or mean another encoder."""
    state = _first_layers(state, model.config.num_hidden_layers, source)
    _refuse_another_architecture(model, state, source, recorded)
    return state


def _first_layers(state: dict[str, torch.Tensor], depth: int, source: str) -> dict[str, torch.Tensor]:
    """`state` without its encoder layers from `depth` on, when it holds exactly layers 0 .. n-1 with
    n > depth: a shallower model asks for the checkpoint's first layers (logged). Anything else is
    left for `_refuse_another_architecture` to judge."""
    layers = _encoder_layers(state)
    if layers != set(range(len(layers))) or len(layers) <= depth:
        return state
    logger.info("warm start from %s: encoder layers 0-%d of its %d (num_hidden_layers %d)", source, depth - 1,
                len(layers), depth)
    return {key: tensor for key, tensor in state.items() if _layer_of(key) is None or _layer_of(key) < depth}


def _refuse_another_architecture(model: BertPreTrainedModel, state: dict[str, torch.Tensor], source: str,
                                 recorded: BertConfig | None) -> None:
    """Refuse warm-start weights that would leave the encoder random or mean another encoder: none of
    its encoder tensors, fewer or other layers, tensors of other shapes, or (per the checkpoint's
    config) another architecture. Heads (MLM / NSP / classifier) and mask logits may be missing:
    they start fresh, named in the report."""
    own = model.state_dict()
    converted = convert_state_dict(state, own_keys=own.keys(), vocab_size=model.config.vocab_size)
    problems = []
    if not any(".encoder." in f".{key}" for key in converted.keys() & own.keys()):
        problems.append("none of its tensors is an encoder weight of this model (is it a BERT checkpoint?)")
    elif _encoder_layers(converted) != _encoder_layers(own):
        problems.append(f"it holds encoder layers {sorted(_encoder_layers(converted))}, this model has "
                        f"{sorted(_encoder_layers(own))}")
    if recorded is not None:
        problems += [f"its config has {name}={getattr(recorded, name)!r}, this model {getattr(model.config, name)!r}"
                     for name in ARCHITECTURE_FIELDS
                     if name != "num_hidden_layers" and getattr(recorded, name) != getattr(model.config, name)]
    # The body only: a task head of another shape (another label count) is the caller's to judge.
    mismatch = _shape_mismatch(own, {key: tensor for key, tensor in converted.items()
                                     if key.removeprefix("bert.").startswith(_BODY_ROOTS)})
    if mismatch and not problems:
        problems.append(mismatch)
    if problems:
        raise ValueError(f"--init_checkpoint {source}: {'; '.join(problems)}: another architecture, from which "
                         f"training would start from random weights: pass a checkpoint of this architecture, or its "
                         f"own config (--config_file <its folder or config.json>)")


def _shape_mismatch(own: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> str | None:
    """The first tensor both hold with other shapes, described, or None."""
    for key, tensor in converted.items():
        if key in own and own[key].shape != tensor.shape:
            return f"'{key}' has shape {tuple(tensor.shape)} but this model needs {tuple(own[key].shape)}"
    return None


_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    match = _LAYER_RE.search(key)
    return int(match.group(1)) if match else None


def _encoder_layers(keys: Iterable[str]) -> set[int]:
    return {layer for key in keys if (layer := _layer_of(key)) is not None}


def recorded_config(checkpoint: dict[str, Any], source: str) -> BertConfig | None:
    """The config a checkpoint records (with the run's command-line overrides applied, which no
    bert_config.json holds), or None when it records none."""
    return BertConfig.from_checkpoint(checkpoint, source)


def weight_meaning(config: BertConfig) -> dict[str, Any]:
    """The fields two configs must share for one's weights and mask logits to mean the same in the other."""
    return {**{name: getattr(config, name) for name in ARCHITECTURE_FIELDS}, **attention_masks.mask_identity(config)}


# Foreign → ours substring renames (Hugging Face and old TF-port names).
_TO_OURS = (
    (".gamma", ".weight"),
    (".beta", ".bias"),
    ("intermediate.dense.", "intermediate.dense_act."),
    ("pooler.dense.", "pooler.dense_act."),
    ("transform.dense.", "transform.dense_act."),
)
_VOCAB_ROW_KEYS = ("embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight")
_BODY_ROOTS = ("embeddings.", "encoder.", "pooler.")
_HEADLESS_ROOTS = (*_BODY_ROOTS, f"{attention_masks.MASK_MODULE}.")


def convert_state_dict(state_dict: dict[str, torch.Tensor], own_keys, vocab_size: int) -> dict[str, torch.Tensor]:
    """Rename an NVIDIA / HF / DDP state dict to this model's keys and pad its vocab rows.

    Rows are padded only from the real vocab size (e.g. HF's 30522) to the padded one (30528); a
    checkpoint with another vocabulary keeps its shape, so the shape check names it.
    """
    own_keys = set(own_keys)
    padded_vocab = math.ceil(vocab_size / 8) * 8
    wants_prefix = any(k.startswith("bert.") for k in own_keys)
    converted = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith(("position_ids", "cls.predictions.decoder.bias")):
            continue  # HF buffers / the HF alias of cls.predictions.bias
        for old, new in _TO_OURS:
            key = key.replace(old, new)
        if wants_prefix and key.startswith(_HEADLESS_ROOTS):
            key = "bert." + key
        elif not wants_prefix:
            key = key.removeprefix("bert.")
        if key.endswith(_VOCAB_ROW_KEYS) and vocab_size <= tensor.size(0) < padded_vocab:
            pad = tensor.new_zeros((padded_vocab - tensor.size(0), *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        converted[key] = tensor
    return converted


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our names → Hugging Face's (`dense_act` → `dense`), vocab rows trimmed to the real vocab.

    DAM mask logits stay (under our name): transformers skips them with a note, and our own reload
    gets the searched mask back instead of a fresh one.
    """
    hf = {}
    for key, tensor in state_dict.items():
        key = key.replace(".dense_act.", ".dense.")
        if key.endswith(_VOCAB_ROW_KEYS):
            tensor = tensor[:vocab_size].contiguous()
        hf[key] = tensor
    if "cls.predictions.bias" in hf:
        hf["cls.predictions.decoder.bias"] = hf["cls.predictions.bias"].clone()
    return hf
