"""`tinyllm bench serve` measures every concurrency level it is asked for, through the real server."""

from __future__ import annotations

import json

from tinyllm.cli import main


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
