"""Calibration/evaluation data: disjoint windows, seeded reproducibility, image splits, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icbs.config import CalibrationConfig, EvalConfig
from icbs.data import build_data, load_text, mnist_split, token_windows, tokenize_text
from icbs.models import ClassifierAdapter, LoadedModel
from icbs.models.builtin import MnistMLP, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_lm() -> LoadedModel:
    from icbs.models import CausalLMAdapter

    model, tokenizer = build_tiny_llama()
    return LoadedModel(model, CausalLMAdapter(), tokenizer, "tiny_llama")


def test_token_windows_never_overlap_and_eval_is_consecutive():
    tokens = torch.arange(10_000)  # token value = its position
    calib = CalibrationConfig(n_samples=50, seq_len=64, split=0.6, seed=3)
    eval_cfg = EvalConfig(n_samples=20, seq_len=100)
    calib_w, calib_starts, eval_w, eval_starts = token_windows(tokens, calib, eval_cfg)
    assert calib_w.shape == (50, 64) and eval_w.shape == (20, 100)
    n_calib = 6000
    assert int(calib_w.max()) < n_calib
    assert int(eval_w.min()) >= n_calib
    assert torch.equal(calib_w[:, 0], calib_starts)
    assert torch.equal(eval_w.flatten(), torch.arange(n_calib, n_calib + 2000))
    assert torch.equal(eval_w[:, 0], eval_starts)
    assert torch.all(calib_w[:, 1:] - calib_w[:, :-1] == 1)
    assert len(set(calib_starts.tolist())) > 40  # random starts, not a fixed stride


def test_token_windows_eval_zero_means_all_and_caps_at_available():
    tokens = torch.arange(1000)
    calib = CalibrationConfig(n_samples=4, seq_len=10, split=0.5)
    _, _, all_w, _ = token_windows(tokens, calib, EvalConfig(n_samples=0, seq_len=64))
    assert all_w.shape == (500 // 64, 64)
    _, _, capped, _ = token_windows(tokens, calib, EvalConfig(n_samples=100, seq_len=64))
    assert capped.shape == (7, 64)


def test_token_windows_too_few_tokens_name_the_setting():
    tokens = torch.arange(300)
    with pytest.raises(ValueError, match="'calibration.seq_len'"):
        token_windows(tokens, CalibrationConfig(seq_len=256, split=0.5), EvalConfig(seq_len=16))
    with pytest.raises(ValueError, match="'eval.seq_len'"):
        token_windows(tokens, CalibrationConfig(n_samples=4, seq_len=16, split=0.5), EvalConfig(seq_len=256))


def test_build_data_pydoc_is_seeded_disjoint_and_batched(tiny_lm):
    calib = CalibrationConfig(source="pydoc", n_samples=10, seq_len=32, batch_size=4, seed=0)
    eval_cfg = EvalConfig(n_samples=5, seq_len=48, batch_size=2)
    calibration, evaluation = build_data(calib, eval_cfg, tiny_lm)
    assert [b["input_ids"].shape for b in calibration] == [(4, 32), (4, 32), (2, 32)]
    assert [b["input_ids"].shape[0] for b in evaluation] == [2, 2, 1]
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in calibration)
    again, again_eval = build_data(calib, eval_cfg, tiny_lm)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calibration, again))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(evaluation, again_eval))
    other, _ = build_data(CalibrationConfig(n_samples=10, seq_len=32, seed=1), eval_cfg, tiny_lm)
    assert not torch.equal(other[0]["input_ids"], calibration[0]["input_ids"][: other[0]["input_ids"].shape[0]])
    # The batches are exactly the token windows of the tokenised corpus: calibration before the split.
    tokens = tokenize_text(load_text(calib), tiny_lm.tokenizer)
    calib_w, calib_starts, eval_w, eval_starts = token_windows(tokens, calib, eval_cfg)
    assert torch.equal(torch.cat([b["input_ids"] for b in calibration]), calib_w)
    assert torch.equal(torch.cat([b["input_ids"] for b in evaluation]), eval_w)
    assert int((calib_starts + calib.seq_len).max()) <= int(eval_starts.min())


def test_build_data_text_folder_and_missing_path(tiny_lm, tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 200)
    (tmp_path / "b.txt").write_text("delta epsilon " * 200)
    calibration, evaluation = build_data(
        CalibrationConfig(source="text", path=str(tmp_path), n_samples=3, seq_len=20, batch_size=8),
        EvalConfig(n_samples=2, seq_len=20),
        tiny_lm,
    )
    assert calibration[0]["input_ids"].shape == (3, 20) and evaluation[0]["input_ids"].shape == (2, 20)
    decoded = tiny_lm.tokenizer.decode(evaluation[-1]["input_ids"][-1])
    assert "delta" in decoded or "epsilon" in decoded
    with pytest.raises(ValueError, match="'calibration.path'"):
        build_data(CalibrationConfig(source="text", path=str(tmp_path / "nope.txt")), EvalConfig(), tiny_lm)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        build_data(CalibrationConfig(source="text", path=str(empty)), EvalConfig(), tiny_lm)


def test_build_data_random_tokens_in_vocab_and_sized(tiny_lm):
    calib = CalibrationConfig(source="random_tokens", n_samples=6, seq_len=16, batch_size=3)
    calibration, evaluation = build_data(calib, EvalConfig(n_samples=4, seq_len=24, batch_size=4), tiny_lm)
    ids = torch.cat([b["input_ids"] for b in calibration])
    assert ids.shape == (6, 16) and int(ids.max()) < tiny_lm.model.config.vocab_size
    assert evaluation[0]["input_ids"].shape == (4, 24)


def test_build_data_source_must_fit_the_model_kind(tiny_lm):
    with pytest.raises(ValueError, match="'calibration.source'"):
        build_data(CalibrationConfig(source="mnist"), EvalConfig(), tiny_lm)
    mlp = LoadedModel(MnistMLP(), ClassifierAdapter(), None, "mlp")
    with pytest.raises(ValueError, match="'calibration.source'"):
        build_data(CalibrationConfig(source="pydoc"), EvalConfig(), mlp)


def test_build_data_hf_dataset_without_package_is_a_clear_error(tiny_lm):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"icbs\[datasets\]"):
            build_data(CalibrationConfig(source="hf_dataset", hf_name="wikitext"), EvalConfig(), tiny_lm)
    else:
        pytest.skip("datasets is installed")


def test_build_data_npz_split_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 784)).astype(np.float32)
    x[:, 0] = np.arange(50)  # sample id
    y = rng.integers(0, 10, size=50)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    mlp = LoadedModel(MnistMLP(), ClassifierAdapter(), None, "mlp")
    calib = CalibrationConfig(source="npz", path=str(tmp_path / "data.npz"), n_samples=12, batch_size=5, split=0.6)
    calibration, evaluation = build_data(calib, EvalConfig(n_samples=0, batch_size=8), mlp)
    calib_ids = torch.cat([b["x"][:, 0] for b in calibration])
    eval_ids = torch.cat([b["x"][:, 0] for b in evaluation])
    assert calib_ids.numel() == 12 and len(set(calib_ids.tolist())) == 12 and calib_ids.max() < 30
    assert torch.equal(eval_ids, torch.arange(30, 50, dtype=torch.float32))
    assert torch.equal(torch.cat([b["y"] for b in evaluation]), torch.as_tensor(y[30:]))
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(ValueError, match="'x' and 'y'"):
        build_data(CalibrationConfig(source="npz", path=str(tmp_path / "bad.npz")), EvalConfig(), mlp)
    with pytest.raises(ValueError, match="'calibration.n_samples'"):
        build_data(
            CalibrationConfig(source="npz", path=str(tmp_path / "data.npz"), n_samples=31, split=0.6), EvalConfig(), mlp
        )


@pytest.mark.integration
def test_build_data_mnist_calibration_from_train_eval_held_out():
    x_train, y_train, x_test, y_test = mnist_split()
    assert x_train.shape == (4000, 784) and x_test.shape == (1000, 784)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    assert len(set(y_train.tolist())) == 10  # shuffled: the raw file is sorted by label
    mlp = LoadedModel(MnistMLP(), ClassifierAdapter(), None, "mlp")
    calib = CalibrationConfig(source="mnist", n_samples=64, batch_size=32, seed=5)
    calibration, evaluation = build_data(calib, EvalConfig(n_samples=200, batch_size=100), mlp)
    calib_x = torch.cat([b["x"] for b in calibration])
    eval_x = torch.cat([b["x"] for b in evaluation])
    assert torch.equal(eval_x, x_test[:200])
    assert float(torch.cdist(calib_x, x_train, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max()) < 1e-4  # every image is a training image
    again, _ = build_data(calib, EvalConfig(n_samples=200), mlp)
    assert torch.equal(torch.cat([b["x"] for b in again]), calib_x)


def test_a_pool_larger_than_the_calibration_text_names_n_samples():
    tokens = torch.arange(1000)  # 500 calibration tokens: at most 15 windows of 32
    calib = CalibrationConfig(n_samples=15, seq_len=32, split=0.5)
    assert token_windows(tokens, calib, EvalConfig(seq_len=16))[0].shape == (15, 32)
    with pytest.raises(ValueError, match=r"'calibration.n_samples' \(16 windows of 32 tokens\).*at most 15 windows fit"):
        token_windows(tokens, CalibrationConfig(n_samples=16, seq_len=32, split=0.5), EvalConfig(seq_len=16))
