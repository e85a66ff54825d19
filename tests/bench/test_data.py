"""`tinyllm bench data` reports prepare throughput per thread count and the loader's rate."""

import json

from tinyllm.cli import main


def test_bench_data_json(capsys):
    assert main(["bench", "data", "--tokens", "20000", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["prepare_tokens_per_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in result["prepare_tokens_per_s"].values())
    assert result["tokens"] >= 15_000 and result["loader_tokens_per_s"] > 0
    assert result["speedup_2_vs_1"] > 0
