"""`tinyllm bench train` measures tinyllm's training step in both precisions and two peers (Hugging
Face's GPT-2 and a plain PyTorch GPT), each in its own process, and reports rates, MFU and memory with sane values (never timings
against thresholds: the machine is shared)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tinyllm.bench import train
from tinyllm.cli import main

KEYS = {"square_limit_fp32", "square_limit_bf16", "shape_limit", "tokens_per_s", "mfu", "mfu_shapes",
        "peer_tokens_per_s", "speedup_vs_peer", "peak_rss_gb", "peer_peak_rss_gb", "allocator", "precision",
        "model_flops_per_s", "flops_per_token", "by_precision", "load_avg", "gpu", "mfu_peak_source",
        "plain_tokens_per_s", "speedup_vs_plain", "plain_peak_rss_gb"}
ALLOCATORS = ("glibc", "glibc, freed memory kept", "jemalloc", "tcmalloc", "mimalloc", "system (unknown)")


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    """One real run on the tiny preset (1 timed step), shared by the tests below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_CACHE", str(tmp_path_factory.mktemp("cache")))  # the children inherit it
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["bench", "train", "--preset", "tiny", "--steps", "1", "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_json_has_every_figure_with_sane_values(tiny_result):
    r = tiny_result
    assert KEYS <= set(r)
    assert r["precision"] in ("fp32", "bf16") and set(r["by_precision"]) == {"fp32", "bf16"}
    for key in ("square_limit_fp32", "square_limit_bf16", "shape_limit", "tokens_per_s", "peer_tokens_per_s",
                "speedup_vs_peer", "peak_rss_gb", "peer_peak_rss_gb", "flops_per_token", "plain_tokens_per_s",
                "speedup_vs_plain", "plain_peak_rss_gb"):
        assert r[key] > 0, key
    for p, figures in r["by_precision"].items():
        assert 0 < figures["mfu"] < 1.5, p
        assert figures["mfu_shapes"] > 0 and len(figures["step_s"]) == 1 and len(figures["warmup_s"]) == 2
    main_run = r["by_precision"][r["precision"]]
    assert (r["tokens_per_s"], r["mfu"], r["peak_rss_gb"]) == (main_run["tokens_per_s"], main_run["mfu"],
                                                               main_run["peak_rss_gb"])
    assert r["model_flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"], rel=1e-3)
    assert r["allocator"] in ALLOCATORS
    # Limits are measured before and after training; each is the best of its two passes.
    assert all(len(v) == 2 for v in r["limit_passes"].values())
    assert r["square_limit_fp32"] == max(r["limit_passes"]["square_fp32"])


@pytest.mark.slow
@pytest.mark.parametrize("side, name", [("peer", "GPT2LMHeadModel"), ("plain", "plain PyTorch GPT-2")])
def test_each_peer_trains_at_the_same_batch(tiny_result, side, name):
    r = tiny_result
    assert name in r[side]["name"] and r[side]["tokens_per_step"] == r["micro_batch"] * r["context"]
    assert r[f"speedup_vs_{side}"] == pytest.approx(r["tokens_per_s"] / r[f"{side}_tokens_per_s"], rel=0.01)
    if r["device"] == "cpu":  # the load-independent ratio, per CPU-second
        assert r[f"speedup_vs_{side}_cpu"] > 0 and r[side]["tokens_per_cpu_s"] > 0
    assert 0 < r[f"{side}_mfu"] < 1.5


@pytest.mark.slow
def test_the_plain_peer_is_the_same_model_as_hugging_faces(tiny_result):
    assert tiny_result["plain"]["parameters"] == tiny_result["peer"]["parameters"]


@pytest.mark.slow
def test_the_table_shows_both_precisions_and_the_peers_only_when_run(tiny_result):
    table = train.format(tiny_result)
    assert f"tinyllm {tiny_result['precision']} (auto)" in table
    assert "peer: HF GPT-2 fp32" in table and "peer: plain PyTorch fp32" in table
    without = {**tiny_result, **train._peer_figures("peer", None, {}, 0.0, 1.0),
               **train._peer_figures("plain", None, {}, 0.0, 1.0)}
    assert "tinyllm fp32" in train.format(without) and "peer" not in train.format(without)


def test_zero_steps_is_a_clear_error(capsys):
    assert main(["bench", "train", "--preset", "tiny", "--steps", "0"]) == 2
    assert "--steps and --micro-batch must be at least 1" in capsys.readouterr().err


def test_allocator_names_the_malloc_in_use():
    assert train.allocator() in ALLOCATORS
