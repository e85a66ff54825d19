"""`tinyllm bench serve` measures every concurrency level it is asked for, through the real server,
with consistent figures."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.bench.serve import bench_serve, format_results
from tinyllm.cli import main
from tinyllm.config import resolve
from tinyllm.model.gpt import GPT
from tinyllm.tokenizer import get_tokenizer


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(resolve("tiny").model).eval()


def test_bench_reports_each_concurrency_level():
    results = bench_serve(tiny_model(), get_tokenizer(), concurrency=(1, 3), max_tokens=5, requests_per_client=2)
    assert [r.clients for r in results] == [1, 3]
    assert [r.requests for r in results] == [2, 6]
    for r in results:
        assert 0 < r.completion_tokens <= r.requests * 5
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.wall_s)
        assert 0 < r.ttft_p50_ms <= r.ttft_max_ms <= r.wall_s * 1000
        assert r.client_tokens_per_s > 0
    table = format_results(results).splitlines()
    assert len(table) == 3 and table[0].split()[0] == "clients"


def test_bench_rejects_empty_levels():
    with pytest.raises(ValueError):
        bench_serve(tiny_model(), get_tokenizer(), concurrency=())


def test_bench_serve_json(capsys):
    code = main(["bench", "serve", "--preset", "tiny", "--concurrency", "1,3", "--max-tokens", "4",
                 "--requests-per-client", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "preset tiny, random weights" and result["max_tokens"] == 4
    assert [level["clients"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["requests"] == level["clients"]
        # Random weights never stop early: every request runs to --max-tokens.
        assert level["completion_tokens"] == 4 * level["requests"]
        assert level["tokens_per_s"] > 0 and 0 < level["ttft_p50_ms"] <= level["ttft_max_ms"]
    one, three = (level["tokens_per_s"] for level in result["levels"])
    assert result["speedup_vs_1"] == {"3": three / one}


def test_bad_concurrency_is_a_clear_error(capsys):
    assert main(["bench", "serve", "--concurrency", "0,8"]) == 2
    assert "--concurrency 0,8" in capsys.readouterr().err
