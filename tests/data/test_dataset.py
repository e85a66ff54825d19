"""The dataset a run reads: its data.dir as given, else the built-in corpus prepared once into a cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tinyllm.config import DataConfig
from tinyllm.data.dataset import default_builtin_dataset, run_dataset, trained_dataset
from tinyllm.data.manifest import MANIFEST, load_manifest
from tinyllm.errors import UserError


def test_a_run_with_a_data_dir_reads_it_and_prepares_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    assert run_dataset(DataConfig(dir=str(tmp_path / "mine"))) == tmp_path / "mine"
    assert not (tmp_path / "cache").exists()


def test_a_trained_runs_data_dir_that_is_gone_is_named_as_the_runs(tmp_path, monkeypatch):
    # eval and bench decode score a finished run: its data.dir may have been deleted since.
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"the run's data .*mine \(data.dir in its config.toml\) is gone"):
        trained_dataset(DataConfig(dir=str(tmp_path / "mine")))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / MANIFEST).write_text("{}")
    assert trained_dataset(DataConfig(dir=str(tmp_path / "mine"))) == tmp_path / "mine"
    assert not (tmp_path / "cache").exists()


def test_a_run_without_a_data_dir_reads_the_cached_builtin_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path))
    path = run_dataset(DataConfig(builtin_tokens=5_000))
    assert path == default_builtin_dataset(max_tokens=5_000, cache_dir=tmp_path)
    assert (path / MANIFEST).is_file()


def test_default_builtin_dataset_is_prepared_once(tmp_path, monkeypatch):
    path = default_builtin_dataset(max_tokens=5_000, cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("builtin-")
    stamp = (path / MANIFEST).stat().st_mtime_ns
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path))
    assert default_builtin_dataset(max_tokens=5_000) == path
    assert (path / MANIFEST).stat().st_mtime_ns == stamp
    assert default_builtin_dataset(max_tokens=6_000, cache_dir=tmp_path) != path


def test_concurrent_requests_for_the_cache_prepare_it_once(tmp_path):
    # Data-parallel ranks all call default_builtin_dataset at start-up.
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: default_builtin_dataset(max_tokens=5_000, cache_dir=tmp_path), range(2)))
    assert paths[0] == paths[1]
    m = load_manifest(paths[0])
    assert sorted(p.name for p in paths[0].iterdir() if not p.name.startswith(".")) == sorted(
        [MANIFEST] + [s["file"] for sp in m["sources"]["builtin"]["splits"].values() for s in sp["shards"]]
    )


def test_chat_fine_tuning_reads_every_question_and_is_scored_on_the_sampled_ones(tmp_path, monkeypatch):
    from tinyllm.data.dataset import qa_dataset
    from tinyllm.eval.qa import held_out_documents

    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path))
    sampled = run_dataset(DataConfig(builtin_tokens=20_000))
    every = run_dataset(DataConfig(builtin_tokens=20_000, builtin_questions="every"))
    assert every != sampled  # its own cache entry: a different corpus
    docs = list(held_out_documents(every, split="train"))
    asked = [len(d.messages or ()) // 2 for d in docs]
    assert min(asked) >= 1 and 6 < max(asked) <= 12  # every story asked, up to 12 questions
    assert sum(not d.messages for d in held_out_documents(sampled, split="train")) > 0.3 * len(docs)
    assert qa_dataset(DataConfig(builtin_tokens=20_000, builtin_questions="every")) == sampled
    assert qa_dataset(DataConfig(dir=str(sampled))) == sampled
