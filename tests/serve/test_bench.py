"""The serving benchmark measures every level it is asked for, with consistent figures."""

from __future__ import annotations

import pytest

from tinyllm.serve.bench import bench_serve, format_results


def test_bench_reports_each_concurrency_level(make_model, tokenizer):
    results = bench_serve(
        make_model(), tokenizer, concurrency=(1, 3), max_tokens=5, requests_per_client=2
    )
    assert [r.clients for r in results] == [1, 3]
    assert [r.requests for r in results] == [2, 6]
    for r in results:
        assert 0 < r.completion_tokens <= r.requests * 5
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.wall_s)
        assert 0 < r.ttft_p50_ms <= r.ttft_max_ms <= r.wall_s * 1000
        assert r.client_tokens_per_s > 0
    table = format_results(results).splitlines()
    assert len(table) == 3 and table[0].split()[0] == "clients"


def test_bench_rejects_empty_levels(make_model, tokenizer):
    with pytest.raises(ValueError):
        bench_serve(make_model(), tokenizer, concurrency=())
