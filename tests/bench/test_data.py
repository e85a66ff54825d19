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


def test_more_cores_than_the_process_may_use_are_refused(capsys, monkeypatch):
    # Pinned to fewer, the run would be reported as this many cores' figure.
    from tinyllm.bench import data

    monkeypatch.setattr(data, "_available_cores", lambda: [0, 1])
    assert main(["bench", "data", "--cores", "1,3"]) == 2
    assert capsys.readouterr().err == ("tinyllm bench: error: --cores 1,3: this process may run on 2 cores; "
                                       "ask for at most that many\n")


def test_on_one_core_the_default_measures_one(capsys, monkeypatch):
    from tinyllm.bench import data

    monkeypatch.setattr(data, "_available_cores", lambda: [0])
    assert main(["bench", "data", "--tokens", "5000", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["prepare_tokens_per_s"]) == {"1"} and "speedup_2_vs_1" not in result
