"""Big-model paths on the CPU: device_map loading and pruning, device/dtype checks, chunked LM head, bf16 Fisher."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from icbs import cli, runner
from icbs.config import ConfigError, ModelConfig, load_config
from icbs.derivatives import estimate_blocks
from icbs.evaluation import causal_lm_nll, evaluate_lm, token_nll
from icbs.models import CausalLMAdapter, load_model
from icbs.models.base import check_dtype_runs
from icbs.models.builtin import build_tiny_llama, tiny_llama_config

# Every module of the tiny Llama placed explicitly (what accelerate would do across devices, here all CPU).
_PER_MODULE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    model, tokenizer = build_tiny_llama(seed=5)
    out = tmp_path_factory.mktemp("tiny_llama_scale")
    CausalLMAdapter().save(model, out, tokenizer)
    return out


def _windows(vocab: int, n_batch: int = 3, n_tokens: int = 17, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (n_batch, n_tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # a padded window
    return ids, mask


@pytest.mark.parametrize("device_map", [{"": "cpu"}, _PER_MODULE_MAP, "auto"], ids=["whole", "per_module", "auto"])
def test_device_map_loads_the_saved_tiny_llama_with_identical_logits(tiny_llama_dir, device_map):
    reference = load_model(ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), device="cpu"))
    loaded = load_model(ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), device_map=device_map))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    ids, mask = _windows(len(reference.tokenizer))
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).logits
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device_map", [_PER_MODULE_MAP, "auto"], ids=["per_module", "auto"])
def test_device_map_run_prunes_and_saves_the_tiny_llama(tiny_llama_dir, tmp_path, device_map):
    cfg = load_config(overrides=[
        "model.kind=causal_lm", f"model.path={tiny_llama_dir}",
        "model.device_map=" + (device_map if isinstance(device_map, str) else json.dumps(device_map)),
        "calibration.source=pydoc", "calibration.n_samples=8", "calibration.seq_len=32", "calibration.batch_size=4",
        "eval.n_samples=4", "eval.seq_len=32", "eval.batch_size=4", "eval.every_s=null", "eval.before=false",
        "blocks.block_size=32", "blocks.k=16", "derivatives.estimator=layerwise", "derivatives.n_samples=8",
        "bcd.time_budget=null", "bcd.max_steps=3",
    ])
    assert cfg.model.device_map == device_map
    outcome = runner.run_prune(cfg, out_dir=tmp_path / "out", progress=False)
    assert outcome.density == pytest.approx(0.5, abs=1e-9)
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    again = runner.run_evaluate(cfg, model_dir=tmp_path / "out")
    assert again.final["perplexity"] == pytest.approx(outcome.final["perplexity"], rel=1e-5)


def test_device_map_naming_an_absent_gpu_fails_before_loading(tmp_path):
    # The path does not exist: the device error must come first, so nothing was read.
    cfg = ModelConfig(kind="causal_lm", path=str(tmp_path / "missing"), device_map={"model.layers.1": "cuda:3"})
    with pytest.raises(ValueError, match=r"^'model.device_map' entry 'model.layers.1' names 'cuda:3' but this machine"):
        load_model(cfg)
    with pytest.raises(ValueError, match="'model.device_map' entry 'lm_head' should be a device"):
        load_model(ModelConfig(kind="causal_lm", path=str(tmp_path / "missing"), device_map={"lm_head": "gpu7"}))


def test_cli_device_map_on_an_absent_gpu_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": {"kind": "causal_lm", "path": str(tmp_path / "missing"),
                                                "device_map": {"": "cuda:3"}}}))
    assert cli.main(["evaluate", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.device_map' entry '' names 'cuda:3'" in err[0]


def test_device_map_unknown_strategy_and_device_conflict_are_config_errors():
    with pytest.raises(ConfigError, match="'model.device_map' should be one of 'auto', 'balanced'"):
        load_config(overrides=["model.builtin=tiny_llama", "model.device_map=everywhere"])
    with pytest.raises(ConfigError, match="'model.device_map' should be unset when model.device is set"):
        load_config(overrides=["model.builtin=tiny_llama", "model.device=cpu", "model.device_map=auto"])


def test_device_map_on_a_model_built_in_memory_is_refused():
    with pytest.raises(ValueError, match="'model.device_map' applies to models loaded through transformers"):
        load_model(ModelConfig(builtin="tiny_llama", kind="causal_lm", device_map="auto"))


def test_dtype_check_refuses_what_a_device_cannot_run_and_float16_runs_on_cpu(tiny_llama_dir):
    with pytest.raises(ValueError, match="^'model.dtype' is 'float64' but MPS has no float64"):
        check_dtype_runs("float64", [torch.device("mps")])
    check_dtype_runs("float16", [torch.device("cpu")])  # this CPU build computes in float16
    loaded = load_model(ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), device="cpu", dtype="float16"))
    ids, mask = _windows(len(loaded.tokenizer))
    metrics = loaded.adapter.evaluate(loaded.model, [{"input_ids": ids, "attention_mask": mask}])
    assert next(loaded.model.parameters()).dtype == torch.float16
    assert 200 < metrics["perplexity"] < 400  # a random model over 259 tokens, computed without overflow


@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
def test_chunked_nll_equals_the_full_logits_nll(chunk_tokens):
    model, tokenizer = build_tiny_llama(seed=2)
    ids, mask = _windows(len(tokenizer))
    with torch.no_grad():
        full, full_valid = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        nll, valid = causal_lm_nll(model, ids, mask, chunk_tokens=chunk_tokens)
    assert torch.equal(valid, full_valid) and int(valid.sum()) == 3 * 16 - 6
    torch.testing.assert_close(nll, full, rtol=0, atol=1e-6)
    losses = CausalLMAdapter().per_sample_loss(model, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(losses, full.sum(dim=1) / full_valid.sum(dim=1), rtol=0, atol=1e-6)


def test_large_vocabulary_evaluation_never_builds_the_full_logits(capsys):
    from transformers import LlamaForCausalLM

    vocab, n_batch, n_tokens = 65536, 8, 128
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)).eval()
    shapes: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    ids = torch.randint(0, vocab, (n_batch, n_tokens), generator=torch.Generator().manual_seed(1))
    try:
        metrics = evaluate_lm(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=True)
    finally:
        handle.remove()
    full = n_batch * (n_tokens - 1) * vocab
    assert max(b * t * v for b, t, v in shapes) <= 1 << 24 <= full // 3  # 64 MiB of float32 against 254 MiB
    assert sum(t for _, t, _ in shapes) == n_tokens - 1  # every position scored exactly once
    assert metrics["n_tokens"] == n_batch * (n_tokens - 1)
    assert "evaluate" in capsys.readouterr().err  # the progress bar


def test_bf16_fisher_estimate_is_close_to_float32():
    model32, _ = build_tiny_llama(seed=4)
    model16, _ = build_tiny_llama(seed=4)
    model16 = model16.to(torch.bfloat16)
    ids, mask = _windows(259, n_batch=8, n_tokens=24, seed=3)
    batch = {"input_ids": ids, "attention_mask": mask}
    idx = torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))[:48]
    loss = CausalLMAdapter().per_sample_loss
    estimates = {}
    for name, model in (("float32", model32), ("bfloat16", model16)):
        layer = model.model.layers[1].self_attn.o_proj
        estimates[name] = estimate_blocks("fisher", model, {"o": (layer, idx)}, batch, loss)["o"]
    ref, low = estimates["float32"], estimates["bfloat16"]
    assert low.g.dtype == low.H.dtype == "float64"
    g_err = abs(low.g - ref.g).max() / abs(ref.g).max()
    h_err = abs(low.H - ref.H).max() / abs(ref.H).max()
    assert g_err < 0.03 and h_err < 0.03, (g_err, h_err)  # about 0.007 each in bf16's 8-bit mantissa


def test_loading_and_saving_draw_progress_bars_only_when_asked(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from icbs.models.causal_lm import load_hf_model, save_hf_model

    model, tokenizer = build_tiny_llama(seed=1)
    save_hf_model(model, tmp_path / "quiet", tokenizer)
    load_hf_model(AutoModelForCausalLM, str(tmp_path / "quiet"), device="cpu")
    quiet = capsys.readouterr().err
    assert "save weights" not in quiet and "load model" not in quiet and "%|" not in quiet
    save_hf_model(model, tmp_path / "shown", tokenizer, progress=True)
    load_hf_model(AutoModelForCausalLM, str(tmp_path / "shown"), device="cpu", progress=True)
    shown = capsys.readouterr().err
    assert "save weights" in shown and "save tokenizer" in shown and "load model" in shown


def test_fisher_pass_builds_no_graph_before_the_first_blocked_layer_and_restores_flags():
    model, _ = build_tiny_llama(seed=6)
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own flag must survive too
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    seen: dict[str, bool] = {}
    early, late = model.model.layers[0].mlp.down_proj, model.model.layers[1].self_attn.q_proj
    handles = [module.register_forward_hook(lambda _m, _a, out, key=key: seen.__setitem__(key, out.requires_grad))
               for key, module in (("early", early), ("late", late))]
    ids, mask = _windows(259)
    try:
        estimate_blocks("fisher", model, {"late": (late, torch.arange(16))}, {"input_ids": ids, "attention_mask": mask},
                        CausalLMAdapter().per_sample_loss)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"early": False, "late": True}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
