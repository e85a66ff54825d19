"""Sources: `--source` specs, local files, and every hub source's record -> document mapping.

Hub sources are tested offline: each test writes a few records in that dataset's real schema
(all of its columns, the hub's file type) and loads them through the registry entry with a local
override, which goes through `datasets.load_dataset(<builder>, data_files=..., streaming=True)`
exactly as the hub path does.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinyllm.data.document import Document
from tinyllm.data.source_specs import parse_spec, resolve_sources
from tinyllm.data.sources import HUB
from tinyllm.errors import UserError


# -- specs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, name, path, weight",
    [
        ("builtin", "builtin", None, 1.0),
        ("builtin:3", "builtin", None, 3.0),
        ("wikipedia=dumps/wiki:0.5", "wikipedia", "dumps/wiki", 0.5),
        ("alpaca=a.jsonl", "alpaca", "a.jsonl", 1.0),
        ("data/*.txt:2", None, "data/*.txt", 2.0),
        ("notes:v2.txt", None, "notes:v2.txt", 1.0),
    ],
)
def test_spec_forms(text, name, path, weight):
    s = parse_spec(text)
    assert (s.name, s.path, s.weight) == (name, path, weight)


@pytest.mark.parametrize("text, message", [
    ("builtin:0", "positive"), ("builtin:-2", "positive"), ("builtin:nan", "positive"),
    ("builtin=x.txt", "only a hub source"), ("wikipedia=", "path after"),
])
def test_bad_specs_are_named(text, message):
    with pytest.raises(UserError, match=message):
        parse_spec(text)


def test_unknown_name_that_is_not_a_path(tmp_path):
    with pytest.raises(UserError, match="no such file, folder or source name 'nosuch'"):
        resolve_sources(["nosuch"])


def test_a_source_given_twice_is_refused():
    with pytest.raises(UserError, match="twice"):
        resolve_sources(["builtin", "builtin:2"])


def test_no_spec_means_builtin():
    (src,) = resolve_sources([], seed=3)
    assert src.name == "builtin" and src.identity()["seed"] == 3


# -- local files -----------------------------------------------------------------------------------
def texts(src, start=0):
    return [d.text for d in src.documents(start)]


def test_folder_of_txt_files_is_one_document_per_file_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "1.txt").write_text("first\nstill first")
    (tmp_path / "skip.md").write_text("not read")
    (src,) = resolve_sources([str(tmp_path)])
    assert texts(src) == ["first\nstill first", "second"]
    (glob_src,) = resolve_sources([str(tmp_path / "**" / "*.txt")])
    assert texts(glob_src) == ["first\nstill first", "second"]


def test_jsonl_json_parquet_with_a_field_and_resume_positions(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"j{i}", "id": i}) for i in range(3)) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps([{"body": "k0"}, {"body": "k1"}]))
    pq.write_table(pa.table({"body": ["p0", "p1", "p2"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    (src,) = resolve_sources([str(tmp_path)], field="body")
    everything = texts(src)
    assert everything == ["j0", "j1", "j2", "k0", "k1", "p0", "p1", "p2"]
    for start in range(len(everything) + 1):
        assert texts(src, start) == everything[start:]


def test_chat_field_becomes_a_conversation(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    (src,) = resolve_sources([str(tmp_path / "c.jsonl")], field="messages")
    assert list(src.documents()) == [Document(messages=tuple(chat))]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok")
    (tmp_path / "b.txt").write_bytes("fine \ufffd literal".encode())
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n{"text": "good"}\n')
    (src,) = resolve_sources([str(tmp_path)])
    assert texts(src) == ["caf\ufffd ok", "fine \ufffd literal", "bad \ufffd byte", "good"]
    assert src.counters.replaced_utf8 == 2


def test_missing_field_names_field_and_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    (src,) = resolve_sources([str(tmp_path / "a.jsonl")])
    with pytest.raises(UserError, match=r"a\.jsonl line 1 has no field 'text'.*--field"):
        list(src.documents())
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    (src,) = resolve_sources([str(tmp_path / "b.parquet")])
    with pytest.raises(UserError, match=r"b\.parquet has no field 'text' \(its columns: content\)"):
        list(src.documents())


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": nope}\n')
    (src,) = resolve_sources([str(tmp_path / "a.jsonl")])
    with pytest.raises(UserError, match=r"a\.jsonl line 2 is not valid JSON"):
        list(src.documents())


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve_sources([str(tmp_path / "gone.txt")])
    with pytest.raises(UserError, match="holds no"):
        resolve_sources([str(tmp_path)])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"\.csv file"):
        resolve_sources([str(tmp_path / "x.csv")])


def test_local_sources_get_distinct_names(tmp_path):
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "stories.txt").write_text(d)
    a, b = resolve_sources([str(tmp_path / "one" / "stories.txt"), str(tmp_path / "two" / "stories.txt")])
    assert (a.name, b.name) == ("local-stories", "local-stories-2")


@pytest.mark.parametrize("second", ["SAME", "DOTTED", "INSIDE"])
def test_a_file_read_by_two_sources_is_refused(tmp_path, monkeypatch, second):
    # Its documents would be trained on twice; a weight is how to give a file a larger share.
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, "notes/a.txt", "notes/b.txt")
    first, second = {"SAME": ("notes/a.txt", "notes/a.txt"), "DOTTED": ("notes/a.txt", "./notes/a.txt"),
                     "INSIDE": ("notes", "notes/b.txt")}[second]
    with pytest.raises(UserError, match=f"--source {second}: .*is also read by --source {first}; give each file once"):
        resolve_sources([first, second])


def test_a_file_named_with_an_equals_sign_is_a_path(tmp_path):
    (path,) = _files(tmp_path, "a=b.txt")
    (src,) = resolve_sources([f"{path}:2"])
    assert texts(src) == ["The text of a=b.txt."] and src.weight == 2
    with pytest.raises(UserError, match="only a hub source takes =PATH"):
        resolve_sources([str(tmp_path / "nosuch=b.txt")])


# -- --val-source -------------------------------------------------------------------------------
def _files(tmp_path, *names):
    paths = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"The text of {name}.")
        paths.append(str(path))
    return paths


def test_val_sources_fix_every_sources_split_and_get_their_own_names(tmp_path):
    train, val, hub_train, hub_val = _files(tmp_path, "a/notes.txt", "b/notes.txt", "wt/x.jsonl", "wv/x.jsonl")
    sources = resolve_sources([train, f"wikipedia={hub_train}"], val_specs=[val, f"wikipedia={hub_val}"])
    assert [(s.name, s.split, s.flag) for s in sources] == [
        ("local-notes", "train", "--source"), ("wikipedia", "train", "--source"),
        ("local-notes-val", "val", "--val-source"), ("wikipedia-val", "val", "--val-source")]
    # Without val sources nothing changes: a hash split, as before.
    assert [s.split for s in resolve_sources([train])] == [None]


@pytest.mark.parametrize("val, message", [
    ("SAME", "is also read by --source"),  # the very file
    ("FOLDER", "and 1 more is also read by --source"),  # a glob over the train folder
    ("builtin", "reads the same documents as --source builtin"),
    ("VAL:2", "a val source takes no weight"),
    ("nosuch.txt", "--val-source: no such file, folder or source name 'nosuch.txt'"),
])
def test_a_val_source_that_would_be_trained_on_or_weighted_is_refused(tmp_path, val, message):
    train, _, val_file = _files(tmp_path, "d/a.txt", "d/b.txt", "v.txt")
    folder = str(tmp_path / "d")
    specs = {"SAME": train, "FOLDER": f"{folder}/*.txt", "VAL:2": f"{val_file}:2"}
    train_specs = [folder] if val == "FOLDER" else (["builtin"] if val == "builtin" else [train])
    with pytest.raises(UserError, match=message.replace("--val-source:", "--val-source nosuch.txt:")):
        resolve_sources(train_specs, val_specs=[specs.get(val, val)])


def test_a_val_source_given_twice_is_refused(tmp_path):
    (val,) = _files(tmp_path, "v.txt")
    with pytest.raises(UserError, match=f"--val-source {val} is given twice"):
        resolve_sources(["builtin"], val_specs=[val, val])
    # Spelled another way, the file would still be scored twice.
    with pytest.raises(UserError, match=f"--val-source {tmp_path}/./v.txt: .*v.txt is also read by --val-source {val}"):
        resolve_sources(["builtin"], val_specs=[val, f"{tmp_path}/./v.txt"])


# -- hub sources through their registry entries ------------------------------------------------------
def _write_parquet(path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_wikipedia(tmp_path):
    _write_parquet(tmp_path / "train-00000-of-00041.parquet", {
        "id": ["12", "25"], "url": ["https://en.wikipedia.org/wiki/Anarchism", "https://en.wikipedia.org/wiki/Autism"],
        "title": ["Anarchism", "Autism"], "text": ["Anarchism is a political philosophy.", "Autism is a condition."],
    })
    (src,) = resolve_sources([f"wikipedia={tmp_path}"])
    assert texts(src) == ["Anarchism is a political philosophy.", "Autism is a condition."]
    assert texts(src, 1) == ["Autism is a condition."]
    assert src.identity()["hub_id"] == "wikimedia/wikipedia"


def test_simplestories(tmp_path):
    n = 2
    _write_parquet(tmp_path / "data" / "train-00000-of-00007.parquet", {
        "story": ["Mia found a shell.", "The fox slept."], "topic": ["sea"] * n, "theme": ["wonder"] * n,
        "style": ["simple"] * n, "feature": ["dialogue"] * n, "grammar": ["past"] * n, "persona": ["child"] * n,
        "initial_word_type": ["noun"] * n, "initial_letter": ["m", "t"], "word_count": [4, 3],
        "character_count": [18, 14], "num_paragraphs": [1, 1], "avg_word_length": [3.5, 3.7],
        "avg_sentence_length": [4.0, 3.0], "flesch_reading_ease": [100.0, 110.0], "flesch_kincaid_grade": [0.5, 0.1],
        "dale_chall_readability_score": [5.0, 4.9], "num_stories_in_completion": [1, 1],
        "expected_num_stories_in_completion": [1, 1], "generation_id": ["g1", "g2"], "model": ["gpt-4o-mini"] * n,
    })
    (src,) = resolve_sources([f"simplestories={tmp_path}"])
    assert texts(src) == ["Mia found a shell.", "The fox slept."]


def test_fineweb_edu(tmp_path):
    _write_parquet(tmp_path / "sample" / "10BT" / "000_00000.parquet", {
        "text": ["Photosynthesis turns light into sugar."], "id": ["<urn:uuid:1>"], "dump": ["CC-MAIN-2024-10"],
        "url": ["https://example.edu/bio"], "file_path": ["s3://commoncrawl/x.warc.gz"], "language": ["en"],
        "language_score": [0.97], "token_count": [7], "score": [3.4], "int_score": [3],
    })
    (src,) = resolve_sources([f"fineweb-edu={tmp_path}"])
    assert texts(src) == ["Photosynthesis turns light into sugar."]


def test_openwebtext2_joins_title_and_text(tmp_path):
    _write_parquet(tmp_path / "webtext2-00000-of-00027.parquet", {
        "title": ["Why bees dance", ""], "text": ["Bees dance to share where food is.", "No title here."],
        "reddit_scores": [[12, 3], [5]],
    })
    (src,) = resolve_sources([f"openwebtext2={tmp_path}"])
    assert texts(src) == ["Why bees dance\n\nBees dance to share where food is.", "No title here."]


ALPACA = {
    "instruction": ["Give three tips for staying healthy.", "Translate to French."],
    "input": ["", "Good morning"],
    "output": ["Eat well, sleep, move.", "Bonjour"],
    "text": ["Below is an instruction... tips", "Below is an instruction... French"],
}


def _chats(src):
    return [[(m["role"], m["content"]) for m in d.messages] for d in src.documents()]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_alpaca_is_a_chat(tmp_path, kind):
    if kind == "parquet":
        _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", ALPACA)
    else:
        rows = [dict(zip(ALPACA, vals, strict=True)) for vals in zip(*ALPACA.values(), strict=True)]
        (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src,) = resolve_sources([f"alpaca={tmp_path}"])
    assert _chats(src) == [
        [("user", "Give three tips for staying healthy."), ("assistant", "Eat well, sleep, move.")],
        [("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")],
    ]


def test_reddit_instruct_is_a_chat(tmp_path):
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", {
        "post_title": ["How do tides work?", "ELI5: rainbows"], "post_text": ["Asking for my kid.", ""],
        "post_scores": [120, 45], "comment_text": ["The moon pulls the sea.", "Light bends in drops."],
        "comment_score": [300, 80],
    })
    (src,) = resolve_sources([f"reddit-instruct={tmp_path}"])
    assert _chats(src) == [
        [("user", "How do tides work?\n\nAsking for my kid."), ("assistant", "The moon pulls the sea.")],
        [("user", "ELI5: rainbows"), ("assistant", "Light bends in drops.")],
    ]


def test_every_hub_source_has_a_test_above():
    tested = {"wikipedia", "simplestories", "fineweb-edu", "openwebtext2", "alpaca", "reddit-instruct"}
    assert set(HUB) == tested


def test_hub_file_missing_a_column_names_it(tmp_path):
    _write_parquet(tmp_path / "x.parquet", {"id": ["1"], "body": ["wrong schema"]})
    (src,) = resolve_sources([f"wikipedia={tmp_path}"])
    with pytest.raises(UserError, match=r"x\.parquet has no field 'text'"):
        list(src.documents())


def test_unreachable_hub_is_a_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (src,) = resolve_sources(["wikipedia"])
    with pytest.raises(UserError, match=r"cannot load wikimedia/wikipedia.*--source wikipedia=PATH"):
        next(iter(src.documents()))


def test_unreadable_local_files_of_a_hub_source_do_not_blame_the_network(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    (src,) = resolve_sources([f"wikipedia={tmp_path / 'train.parquet'}"])
    with pytest.raises(UserError, match="cannot load .*train.parquet .*check that they are wikipedia's own") as e:
        next(iter(src.documents()))
    assert "network" not in str(e.value)


@pytest.mark.parametrize("name", ["b.txt", "b.jsonl", "b.json", "b.parquet"])
def test_a_file_deleted_while_its_source_is_read_is_named(tmp_path, name):
    (tmp_path / "a.txt").write_text("first")
    record = {"text": "second"}
    {"b.txt": lambda p: p.write_text("second"), "b.jsonl": lambda p: p.write_text(json.dumps(record) + "\n"),
     "b.json": lambda p: p.write_text(json.dumps([record])),
     "b.parquet": lambda p: pq.write_table(pa.table({"text": ["second"]}), p)}[name](tmp_path / name)
    (src,) = resolve_sources([str(tmp_path)])
    docs = src.documents()
    assert next(docs).text == "first"
    (tmp_path / name).unlink()  # a long prepare of a folder: someone moves a file it has not reached
    with pytest.raises(UserError, match=rf"{name} is gone: it was deleted or moved while tinyllm prepare read"):
        next(docs)


def test_a_hub_source_that_fails_says_so_once_without_the_libraries_log_lines(tmp_path, caplog, monkeypatch):
    # The user reads one line: not `datasets`' "Failed to load JSON ..." before it, nor, offline,
    # huggingface_hub's ten "Retrying in 8s" lines.
    (tmp_path / "wiki.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (src,) = resolve_sources([f"wikipedia={tmp_path / 'wiki.jsonl'}"])
    with pytest.raises(UserError, match=r"wiki\.jsonl failed \(ArrowInvalid: JSON parse error"):
        list(src.documents())
    import datasets

    def offline(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (src,) = resolve_sources(["wikipedia"])
    with pytest.raises(UserError, match="cannot load wikimedia/wikipedia"):
        next(iter(src.documents()))
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("datasets", "huggingface_hub"))] == []
    assert logging.getLogger("datasets").level == logging.getLogger("huggingface_hub").level == logging.WARNING


def test_a_utf8_byte_order_mark_is_no_part_of_the_text(tmp_path):
    # As Windows editors save UTF-8: such a .jsonl was refused ("line 1 is not valid JSON ... fix or
    # remove that line"), and a .txt document began with an invisible U+FEFF token.
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + b"Hello there.")
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "c.json").write_bytes(bom + b'[{"text": "third"}]')
    (src,) = resolve_sources([str(tmp_path)])
    assert texts(src) == ["Hello there.", "first", "second", "third"]
    assert src.counters.replaced_utf8 == 0
