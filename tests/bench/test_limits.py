"""The GEMM list behind the shape limit counts exactly the model FLOPs that MFU divides, and the
shape limit is the FLOP-weighted harmonic mean of the measured rates."""

from __future__ import annotations

import pytest
import torch

from tinyllm.bench import limits
from tinyllm.bench.limits import Gemm, model_gemms, part_of, shape_limit
from tinyllm.config import resolve
from tinyllm.model.gpt import GPT


@pytest.mark.parametrize("preset", ["tiny", "cpu", "seed", "modern"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gemm_flops_add_up_to_flops_per_token(preset, batch):
    cfg = resolve(preset)
    with torch.device("meta"):
        model = GPT(cfg.model)
    gemms = model_gemms(cfg.model, batch, cfg.model.block_size)
    assert sum(g.step_flops for g in gemms) == pytest.approx(model.flops_per_token() * batch * cfg.model.block_size, rel=1e-9)
    assert {part_of(g) for g in gemms} == {"linears", "head", "attention"}


def test_loss_chunks_set_the_head_shapes():
    cfg = resolve("seed").model
    head = {g.name: g for g in model_gemms(cfg, 16, 512, chunk_size=1024) if part_of(g) == "head"}
    assert (head["head forward"].m, head["head forward"].n, head["head forward"].count) == (1024, cfg.padded_vocab_size, 8)
    assert (head["head weight grad"].m, head["head weight grad"].k) == (cfg.padded_vocab_size, 1024)


def test_shape_limit_is_the_flop_weighted_harmonic_mean(monkeypatch):
    fast, slow = Gemm("mlp.c_fc forward", 8, 4, 2, count=3), Gemm("attention QK^T", 8, 4, 2, "nt", batch=2)
    rates = {fast: 100.0, slow: 25.0}
    monkeypatch.setattr(limits, "gemm_rate", lambda g, dtype, device: rates[g])
    result = shape_limit([fast, slow], torch.float32, torch.device("cpu"))
    flops = fast.step_flops + slow.step_flops  # 3 x 128 + 256
    assert result.flops_per_s == pytest.approx(flops / (fast.step_flops / 100 + slow.step_flops / 25))
    parts = result.by_part()
    assert parts["linears"] == pytest.approx({"flops_per_s": 100.0, "flop_share": 384 / 640})
    assert parts["attention"] == pytest.approx({"flops_per_s": 25.0, "flop_share": 256 / 640})


def test_two_passes_keep_each_shape_at_its_faster_rate(monkeypatch):
    a, b = Gemm("head forward", 8, 4, 2), Gemm("attention PV", 8, 4, 2, batch=2)

    def measured(rates: dict) -> limits.ShapeLimit:
        monkeypatch.setattr(limits, "gemm_rate", lambda g, dtype, device: rates[g])
        return shape_limit([a, b], torch.float32, torch.device("cpu"))

    first, second = measured({a: 100.0, b: 10.0}), measured({a: 50.0, b: 40.0})
    best = limits.faster_of(second, first)
    assert dict(best.rates) == {a: 100.0, b: 40.0}
    assert best.flops_per_s > max(first.flops_per_s, second.flops_per_s)


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_every_layout_runs_and_has_a_positive_rate(layout):
    g = Gemm("probe", 16, 8, 4, layout, batch=2 if layout == "nt" else 0)
    assert limits.gemm_rate(g, torch.float32, torch.device("cpu"), window_s=0.001, windows=1) > 0
