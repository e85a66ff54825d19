"""python-docs: real English from this Python's own standard library, built with no network."""

from __future__ import annotations

import itertools

from tinyllm.data import pydocs
from tinyllm.data.manifest import load_manifest
from tinyllm.data.source_specs import resolve_sources

from .test_prepare import decoded


def test_a_module_is_its_docstrings_in_order_each_after_its_name(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""A package."""\n')
    (tmp_path / "pkg" / "shapes.py").write_text(
        '"""Shapes and their areas."""\n\n'
        "class Circle:\n    '''A round shape.'''\n\n    def area(self):\n        '''Return pi r squared.'''\n\n"
        "    def _hidden(self):\n        pass\n\n"
        "async def fetch():\n    '''Fetch a shape.'''\n")
    (tmp_path / "pkg" / "bare.py").write_text("x = 1\n")  # no docstring: no document
    (tmp_path / "test").mkdir()  # tests, codecs and installed packages are not the documentation
    for skipped in ("test/test_shapes.py", "encodings/cp1252.py", "site-packages/numpy.py"):
        (tmp_path / skipped).parent.mkdir(exist_ok=True)
        (tmp_path / skipped).write_text('"""Not documentation."""\n')
    (tmp_path / "broken.py").write_text('"""A template, not Python."""\n$x = {{ value }}\n')
    docs = [d.text for d in pydocs.documents(root=tmp_path)]
    modules = docs[: len(docs) - len(pydocs._topics())]
    assert modules == [
        "pkg\n\nA package.",
        "pkg.shapes\n\nShapes and their areas.\n\npkg.shapes.Circle\n\nA round shape.\n\n"
        "pkg.shapes.Circle.area\n\nReturn pi r squared.\n\npkg.shapes.fetch\n\nFetch a shape.",
    ]
    assert [d.text for d in pydocs.documents(1, root=tmp_path)] == docs[1:]  # resume by document number


def test_identity_follows_the_files(tmp_path):
    (tmp_path / "a.py").write_text('"""A."""\n')
    before = pydocs.identity(tmp_path)
    assert pydocs.identity(tmp_path) == before
    (tmp_path / "a.py").write_text('"""A longer docstring."""\n')
    assert pydocs.identity(tmp_path) != before


def test_this_pythons_docs_are_real_english_and_prepare_offline(tmp_path, quiet_prepare):
    first = [d.text for d in itertools.islice(pydocs.documents(), 40)]
    words = " ".join(first).split()
    assert len(words) > 10_000
    for common in ("the", "of", "and", "is", "to", "returns"):  # prose, not code
        assert sum(w.lower().strip(".,") == common for w in words) > 20, common
    (src,) = resolve_sources(["python-docs"])
    m = quiet_prepare([src], tmp_path, max_tokens=20_000, val_fraction=0.1)
    assert 20_000 <= sum(s["tokens"] for s in m["splits"].values()) < 40_000
    assert m["sources"]["python-docs"]["splits"]["val"]["documents"] > 0 and "floor" not in m
    got = decoded(tmp_path, m, "python-docs", "train") + decoded(tmp_path, m, "python-docs", "val")
    assert sorted(got) == sorted(first[: len(got)])
    assert load_manifest(tmp_path)["config"]["sources"][0]["identity"]["kind"] == "python-docs"
