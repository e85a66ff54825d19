"""Fixtures of the multi-process tests (test_distributed, test_launch): a small builtin dataset and
a plain process (no torchrun variables), so each test starts its own processes as a user would."""

import pytest

from tinyllm.data.dataset import default_builtin_dataset

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=60_000, cache_dir=tmp_path_factory.mktemp("cache")))


@pytest.fixture
def no_torchrun(monkeypatch):
    """The tests themselves run as one plain process."""
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
