"""`tinyllm bench decode` reports decoding rates with and without the KV cache, and its batched
greedy loop decodes what `generate` decodes."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.bench.decode import greedy_decode
from tinyllm.cli import main
from tinyllm.config import resolve
from tinyllm.inference.quantize import weight_bytes
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT, GPTConfig


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_decode_json(capsys, restore_threads):
    assert main(["bench", "decode", "--preset", "tiny", "--new-tokens", "6", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == GPT(resolve("tiny").model).num_params()
    assert (result["prompt_tokens"], result["new_tokens"], result["threads"]) == (16, 6, 1)
    for mode in ("kv_cache", "no_cache"):
        assert set(result["tokens_per_s"][mode]) == {"1", "8"}
        assert all(rate > 0 for rate in result["tokens_per_s"][mode].values())
    rates = result["tokens_per_s"]
    assert result["speedup_kv_cache"] == pytest.approx(rates["kv_cache"]["1"] / rates["no_cache"]["1"], rel=0.01)
    # Batch 1's memory bound: the weights' bytes at the measured GEMV bandwidth.
    limit = result["gemv_bandwidth_gb_s"] * 1e9 / result["weight_bytes_per_token"]
    assert result["limit_tokens_per_s"] == pytest.approx(limit, rel=0.01)
    assert result["mbu"] == pytest.approx(rates["kv_cache"]["1"] / limit, rel=0.01)
    assert result["speedup_kv_cache_limit"] == pytest.approx(limit / rates["no_cache"]["1"], rel=0.01)


def test_a_decoding_step_reads_every_weight_but_the_embedding_tables_once():
    cfg = resolve("tiny").model
    model = GPT(cfg)
    assert model.lm_head is None  # tied: the head is the token table's real rows
    tables = model.wte.weight.numel() + model.wpe.weight.numel()
    matrices = model.num_params() - tables + cfg.vocab_size * cfg.n_embd
    assert weight_bytes(model) == 4 * matrices
    assert weight_bytes(model.to(torch.bfloat16)) == 2 * matrices


@pytest.mark.parametrize("options", [["--preset", "tiny"], ["--preset", "modern", "--batch-sizes", "1"]])
def test_bench_decode_in_bf16(capsys, restore_threads, options):
    """bf16 weights and cache (learned positions and RoPE alike) decode and are reported as such."""
    assert main(["bench", "decode", *options, "--new-tokens", "3", "--threads", "1", "--dtype", "bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bf16" and result["tokens_per_s"]["kv_cache"]["1"] > 0


def test_more_tokens_than_the_context_is_a_clear_error(capsys):
    assert main(["bench", "decode", "--preset", "tiny", "--new-tokens", "20"]) == 2
    assert "exceed preset tiny's context of 32 tokens" in capsys.readouterr().err


def test_batched_greedy_decoding_matches_generate():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)  # sharpen: greedy choices are not decided by float noise
    prompts = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = greedy_decode(model, prompts, 12, use_cache=True)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, greedy_decode(model, prompts, 12, use_cache=False))
    for row, out in zip(prompts.tolist(), cached.tolist(), strict=True):
        assert list(generate(model, row, 12, temperature=0)) == out


def test_bench_decode_int8_reports_speedup_and_quality_of_a_run(capsys, restore_threads, tmp_path):
    from tinyllm.data.dataset import default_builtin_dataset
    from tinyllm.train.trainer import Trainer

    data = default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path / "cache")
    cfg = resolve("tiny", overrides=[("data.dir", str(data), "test"), ("train.max_steps", 3, "test"),
                                     ("train.eval_every", 0, "test"), ("train.sample_every", 0, "test")])
    Trainer(cfg, tmp_path / "run", echo=False).run()
    options = ["bench", "decode", "--preset", "tiny", "--new-tokens", "4", "--threads", "1", "--batch-sizes", "1",
               "--quantize", "int8", "--json"]
    assert main(options) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"] == "int8" and result["unquantized_tokens_per_s"] > 0
    assert result["speedup_int8"] == pytest.approx(
        result["tokens_per_s"]["kv_cache"]["1"] / result["unquantized_tokens_per_s"], rel=0.02)
    assert result["int8_val_loss_ratio"] is None and result["int8_greedy_match"] is None  # random weights: no quality
    assert main([*options, "--run", str(tmp_path / "run"), "--prompts", "4", "--match-tokens", "4",
                 "--quality-batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["int8_val_loss_ratio"] == pytest.approx(1.0, abs=0.01)
    assert 0 <= result["int8_greedy_match"] <= 1 and result["int8_greedy_prompts"] == 4


def test_bench_decode_bad_quantize_is_a_one_line_error(capsys):
    assert main(["bench", "decode", "--preset", "tiny", "--quantize", "fp8"]) == 2
    assert capsys.readouterr().err == "tinyllm bench: error: --quantize fp8: choose one of none, int8\n"


@pytest.mark.parametrize(("flags", "message"), [
    (["--run", "{tmp}/nowhere", "--quantize", "int8"], "{tmp}/nowhere: no such run or checkpoint directory"),
    (["--run", "{tmp}"], "--run scores int8's quality on a trained run: add --quantize int8"),
])
def test_a_wrong_run_is_refused_before_the_speed_runs(tmp_path, capsys, monkeypatch, flags, message):
    # Found after the speed runs, a typo cost the user minutes of the benchmark first.
    from tinyllm.bench import decode

    monkeypatch.setattr(decode, "_rates", lambda *a: pytest.fail("the speed runs started"))
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["bench", "decode", "--preset", "tiny", *flags]) == 2
    assert capsys.readouterr().err == f"tinyllm bench: error: {message.format(tmp=tmp_path)}\n"
