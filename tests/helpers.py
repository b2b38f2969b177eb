"""Constants shared by the pretraining tests: module-level parametrize lists and hypothesis
strategies use them, where a fixture cannot reach. Everything callable is a fixture in conftest."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "vocab" / "vocab"
SEQ, MAX_PRED = 32, 3
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, mask_seq_length=SEQ, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1)
