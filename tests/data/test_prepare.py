"""prepare: documents round-trip exactly, the split is stable, runs resume and refuse mix-ups."""

from __future__ import annotations

import json

import pytest

from tinyllm.data.builtin import BuiltinCorpus, entropy_floor
from tinyllm.data.document import Document
from tinyllm.data.manifest import MANIFEST, load_manifest
from tinyllm.data.shards import Shard
from tinyllm.data.source_specs import resolve_sources
from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

from .conftest import ListSource, make_docs


def shard_docs(out, manifest, name, split) -> list[list[int]]:
    docs = []
    for entry in manifest["sources"][name]["splits"][split]["shards"]:
        shard = Shard(out / entry["file"], VOCAB_SIZE, expect=entry)
        docs += [shard.document(i).tolist() for i in range(shard.n_docs)]
    return docs


def decoded(out, manifest, name, split) -> list[str]:
    tok = get_tokenizer()
    out_docs = shard_docs(out, manifest, name, split)
    assert all(d[-1] == EOT and EOT not in d[:-1] for d in out_docs)
    return [tok.decode(d[:-1]) for d in out_docs]


def test_every_document_round_trips_exactly(tmp_path, quiet_prepare):
    docs = make_docs(300)
    docs[5] = Document(text="Unicode: naïve café, 東京, emoji 🙂, and <|endoftext|> typed as text.")
    docs[6] = Document(text="Q&A follows.", messages=({"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}))
    m = quiet_prepare([ListSource("toy", docs)], tmp_path, shard_tokens=500)  # many shards
    assert len(m["sources"]["toy"]["splits"]["train"]["shards"]) > 3
    got = decoded(tmp_path, m, "toy", "train") + decoded(tmp_path, m, "toy", "val")
    assert sorted(got) == sorted(d.rendered() for d in docs)
    # Within a split, the source's order is kept.
    train = decoded(tmp_path, m, "toy", "train")
    assert train == [d.rendered() for d in docs if d.rendered() in set(train)]


def test_split_is_deterministic_and_small_runs_get_val(tmp_path, quiet_prepare):
    docs = make_docs(40)
    a = quiet_prepare([ListSource("toy", docs)], tmp_path / "a")
    b = quiet_prepare([ListSource("toy", docs)], tmp_path / "b")
    assert decoded(tmp_path / "a", a, "toy", "val") == decoded(tmp_path / "b", b, "toy", "val")
    assert a["splits"] == b["splits"]
    assert 1 <= a["splits"]["val"]["documents"] < 20  # the early bar, with val_fraction 0.01
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 40


def test_val_fraction_is_respected_on_larger_runs(tmp_path, quiet_prepare):
    m = quiet_prepare([ListSource("toy", make_docs(4000, max_words=8))], tmp_path, val_fraction=0.1)
    val = m["splits"]["val"]["documents"]
    assert 400 - 3 * 19 < val < 400 + 3 * 19 + 8  # binomial(4000, 0.1) sd ~19, plus the early bar


def test_caps_stop_each_source(tmp_path, quiet_prepare):
    docs = make_docs(200)
    m = quiet_prepare([ListSource("a", docs), ListSource("b", make_docs(200, seed=1))], tmp_path / "d", max_docs=50)
    for name in ("a", "b"):
        sp = m["sources"][name]["splits"]
        assert sp["train"]["documents"] + sp["val"]["documents"] == 50
    m = quiet_prepare([ListSource("a", docs)], tmp_path / "t", max_tokens=1000)
    total = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert 1000 <= total < 1000 + 70  # stops after the document that reaches the cap


def test_empty_documents_are_skipped_and_counted(tmp_path, quiet_prepare):
    docs = make_docs(20)
    docs[3] = Document(text="   \n")
    docs[9] = Document(text="")
    m = quiet_prepare([ListSource("toy", docs)], tmp_path)
    assert m["sources"]["toy"]["skipped_empty"] == 2
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 18


def test_source_with_only_empty_documents_is_an_error(tmp_path, quiet_prepare):
    with pytest.raises(UserError, match="gave no documents.*3 empty"):
        quiet_prepare([ListSource("toy", [Document(text="")] * 3)], tmp_path)


def test_invalid_utf8_count_reaches_the_manifest(tmp_path, quiet_prepare):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "in" / "b.txt").write_text("plain")
    m = quiet_prepare(resolve_sources([str(tmp_path / "in")]), tmp_path / "out")
    (entry,) = m["sources"].values()
    assert entry["replaced_utf8"] == 1


def test_bad_chat_message_names_source_and_record(tmp_path, quiet_prepare):
    docs = make_docs(5) + [Document(messages=({"role": "robot", "content": "beep"},))]
    with pytest.raises(UserError, match="toy, record 5: message 0 has role 'robot'"):
        quiet_prepare([ListSource("toy", docs)], tmp_path)


def test_bad_chat_message_in_a_folder_names_its_file_and_line(tmp_path, quiet_prepare):
    # In a folder of files the source's record number does not say which file to open.
    chat = '{"text": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(chat * 4)
    (tmp_path / "in" / "b.jsonl").write_text(chat + "\n" + chat.replace("assistant", "bot"))
    with pytest.raises(UserError, match=r"b\.jsonl line 3: message 1 has role 'bot'"):
        quiet_prepare(resolve_sources([str(tmp_path / "in")]), tmp_path / "out")


def test_bad_input_into_an_empty_directory_leaves_it_empty_so_the_fixed_input_runs(tmp_path, quiet_prepare):
    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "out"
    good.write_text("".join(json.dumps({"text": f"note {i}: the cat sat on the mat."}) + "\n" for i in range(20)))
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    out.mkdir()  # made by the user, e.g. a mount point
    with pytest.raises(UserError, match="bad.jsonl line 2 is not valid JSON"):
        quiet_prepare(resolve_sources([str(good), str(bad)]), out, shard_tokens=8)  # good's shards are finished
    assert out.is_dir() and list(out.iterdir()) == []
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fixed"}) + "\n")
    m = quiet_prepare(resolve_sources([str(good), str(bad)]), out, shard_tokens=8)
    assert m["sources"]["local-bad"]["splits"]["train"]["documents"] + m["sources"]["local-bad"]["splits"]["val"]["documents"] == 2


def test_a_hub_stream_cut_off_keeps_its_finished_shards_and_a_rerun_resumes(tmp_path, quiet_prepare, monkeypatch):
    from tinyllm.data.sources import HubSource

    stories = [{"story": f"Story {i}: a fox ran to the river and sat down."} for i in range(60)]
    cut = {"after": 40}

    def stream(self):  # the hub's records; the connection drops after `cut["after"]` of them
        class Records:
            def skip(self, n):
                return iter(stories[n:])

            def __iter__(self):
                for i, r in enumerate(stories):
                    if i == cut["after"]:
                        raise ConnectionError("Connection reset by peer")
                    yield r
        return Records()

    monkeypatch.setattr(HubSource, "_load", stream)
    monkeypatch.setattr("tinyllm.data.ingest.CHUNK_DOCS", 16)  # progress is saved per chunk: some are before the cut
    out = tmp_path / "new" / "ds"
    with pytest.raises(UserError, match="reading SimpleStories/SimpleStories on the Hugging Face hub failed"):
        quiet_prepare(resolve_sources(["simplestories"]), out, shard_tokens=64)
    assert (out / "progress.json").is_file()  # hours of streaming are not thrown away
    cut["after"] = None
    m = quiet_prepare(resolve_sources(["simplestories"]), out, shard_tokens=64)
    splits = m["sources"]["simplestories"]["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 60


def test_bad_input_leaves_no_directory_it_made_not_even_a_parent(tmp_path, quiet_prepare):
    with pytest.raises(UserError, match="gave no documents"):
        quiet_prepare([ListSource("toy", [Document(text=" ")])], tmp_path / "new" / "deep" / "ds")
    assert list(tmp_path.iterdir()) == []


def test_an_out_below_a_file_is_a_user_error(tmp_path, quiet_prepare):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--out .*notes.txt/ds: a part of that path is a file"):
        quiet_prepare([ListSource("toy", make_docs(3))], tmp_path / "notes.txt" / "ds")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_interrupted_run_resumes_to_the_same_dataset(tmp_path, quiet_prepare, monkeypatch):
    monkeypatch.setattr("tinyllm.data.ingest.CHUNK_DOCS", 16)  # so the interruption lands mid-stream
    docs = make_docs(400)
    whole = quiet_prepare([ListSource("toy", docs)], tmp_path / "whole", shard_tokens=800)
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare([ListSource("toy", docs, fail_after=250)], tmp_path / "resumed", shard_tokens=800)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    kept = progress["sources"]["toy"]["splits"]["train"]["shards"]
    assert kept and 0 < progress["sources"]["toy"]["position"] <= 250
    assert not list((tmp_path / "resumed").glob(".*tmp*"))  # no half-written shard left behind
    resumed = quiet_prepare([ListSource("toy", docs)], tmp_path / "resumed", shard_tokens=800)
    assert resumed["sources"] == whole["sources"]  # same shards, counts and CRCs
    for entry in whole["sources"]["toy"]["splits"]["train"]["shards"]:
        assert (tmp_path / "whole" / entry["file"]).read_bytes() == (tmp_path / "resumed" / entry["file"]).read_bytes()
    assert not (tmp_path / "resumed" / "progress.json").exists()


def test_rerun_with_other_sources_or_tokenizer_is_refused(tmp_path, quiet_prepare):
    docs = make_docs(30)
    quiet_prepare([ListSource("toy", docs)], tmp_path)
    with pytest.raises(UserError, match="other sources"):
        quiet_prepare([ListSource("other", docs)], tmp_path)
    with pytest.raises(UserError, match=r"other settings \(val_fraction 0.01 -> 0.2\)"):
        quiet_prepare([ListSource("toy", docs)], tmp_path, val_fraction=0.2)
    with pytest.raises(UserError, match=r"other settings \(toy max_docs None -> 5\)"):
        quiet_prepare([ListSource("toy", docs)], tmp_path, max_docs=5)
    with pytest.raises(UserError, match=r"other settings \(toy files\)"):
        quiet_prepare([ListSource("toy", docs[:-1])], tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["config"]["tokenizer"] = manifest["tokenizer"] = {"name": "llama", "vocab_size": 32000}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another tokenizer"):
        quiet_prepare([ListSource("toy", docs)], tmp_path)
    with pytest.raises(UserError, match="prepared with tokenizer 'llama'"):
        load_manifest(tmp_path)


def test_rerun_with_same_settings_only_updates_weights(tmp_path, quiet_prepare):
    docs = make_docs(30)
    first = quiet_prepare([ListSource("toy", docs)], tmp_path)
    again = quiet_prepare([ListSource("toy", docs, weight=3.0)], tmp_path)
    assert again["sources"]["toy"]["weight"] == 3.0
    assert again["sources"]["toy"]["splits"] == first["sources"]["toy"]["splits"]
    assert load_manifest(tmp_path)["sources"]["toy"]["weight"] == 3.0


def test_unrelated_nonempty_directory_is_refused(tmp_path, quiet_prepare):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        quiet_prepare([ListSource("toy", make_docs(5))], tmp_path)


def test_builtin_floor_is_the_val_entropy(tmp_path, quiet_prepare):
    m = quiet_prepare(resolve_sources([]), tmp_path, max_tokens=20_000)
    n = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    docs = [BuiltinCorpus(seed=0).document(i) for i in range(n)]  # builtin documents are never empty
    by_text = {d.rendered(): d for d in docs}
    val_docs = [by_text[t] for t in decoded(tmp_path, m, "builtin", "val")]
    assert m["floor"] == pytest.approx(entropy_floor(val_docs, get_tokenizer()), rel=1e-9)
    assert m["sources"]["builtin"]["floor"] == m["floor"]


def test_mixed_sources_have_per_source_floor_only(tmp_path, quiet_prepare):
    scored = [Document(text=d.text, logprob=-10.0) for d in make_docs(30)]
    m = quiet_prepare([ListSource("scored", scored), ListSource("plain", make_docs(30, seed=2))], tmp_path)
    assert "floor" not in m and "floor" not in m["sources"]["plain"]
    val = m["sources"]["scored"]["splits"]["val"]
    assert m["sources"]["scored"]["floor"] == pytest.approx(10.0 * val["documents"] / val["tokens"])


def test_val_sources_hold_all_of_val_and_train_sources_all_of_train(tmp_path, quiet_prepare):
    train, held = make_docs(300), make_docs(20, seed=7)
    m = quiet_prepare([ListSource("mine", train, split="train"), ListSource("held", held, split="val")], tmp_path)
    # The whole train set is trained on, in order, and val is exactly the held-out files.
    assert decoded(tmp_path, m, "mine", "train") == [d.rendered() for d in train]
    assert decoded(tmp_path, m, "held", "val") == [d.rendered() for d in held]
    assert m["sources"]["mine"]["splits"]["val"]["documents"] == 0
    assert m["sources"]["held"]["splits"]["train"]["documents"] == 0
    assert (m["sources"]["mine"]["split"], m["sources"]["held"]["split"]) == ("train", "val")
    assert m["config"]["val_fraction"] is None
    # Asked again it is the same dataset; asked with the roles undone it is refused, saying how.
    assert quiet_prepare([ListSource("mine", train, split="train"), ListSource("held", held, split="val")],
                         tmp_path)["sources"] == m["sources"]
    with pytest.raises(UserError, match=r"other settings \(val_fraction None -> 0.01, mine all train "
                       r"\(--source with --val-source\) -> split by hash, held all val \(--val-source\) -> split by hash"):
        quiet_prepare([ListSource("mine", train), ListSource("held", held)], tmp_path)


def test_an_interrupted_run_with_val_sources_resumes_to_the_same_dataset(tmp_path, quiet_prepare, monkeypatch):
    monkeypatch.setattr("tinyllm.data.ingest.CHUNK_DOCS", 16)
    train, held = make_docs(200), make_docs(120, seed=7)

    def sources(fail_after=None):
        return [ListSource("mine", train, split="train"), ListSource("held", held, split="val", fail_after=fail_after)]

    whole = quiet_prepare(sources(), tmp_path / "whole", shard_tokens=800)
    with pytest.raises(KeyboardInterrupt):  # in the val source, after some of its shards are done
        quiet_prepare(sources(fail_after=90), tmp_path / "resumed", shard_tokens=800)
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["sources"]["held"]["position"] > 0
    assert quiet_prepare(sources(), tmp_path / "resumed", shard_tokens=800)["sources"] == whole["sources"]


def test_hash_split_datasets_record_no_split_so_older_ones_still_match(tmp_path, quiet_prepare):
    m = quiet_prepare([ListSource("toy", make_docs(30))], tmp_path)
    assert "split" not in m["sources"]["toy"] and "split" not in m["config"]["sources"][0]
    assert m["config"]["val_fraction"] == 0.01


def test_a_builtin_val_source_gives_the_dataset_its_floor(tmp_path, quiet_prepare):
    builtin = resolve_sources([], seed=0)[0]
    builtin.split = "val"
    m = quiet_prepare([ListSource("mine", make_docs(50), split="train"), builtin], tmp_path, max_docs=40)
    assert m["floor"] == m["sources"]["builtin"]["floor"] > 0  # the val split is the builtin corpus alone


def test_an_empty_val_source_is_named_as_a_val_source(tmp_path, quiet_prepare):
    with pytest.raises(UserError, match="--val-source held gave no documents"):
        quiet_prepare([ListSource("mine", make_docs(5), split="train"),
                       ListSource("held", [Document(text=" ")], split="val")], tmp_path)


def shard_masks(out, manifest, name, split) -> list[list[int]]:
    masks = []
    for entry in manifest["sources"][name]["splits"][split]["shards"]:
        shard = Shard(out / entry["file"], VOCAB_SIZE, expect=entry)
        off = shard.offsets
        masks += [shard.assistant(int(off[i]), int(off[i + 1])).astype(int).tolist() for i in range(shard.n_docs)]
    return masks


def chat_docs(n: int, max_words: int = 60) -> list[Document]:
    """Stories, some followed by one or two Q&A turns (one with a system message)."""
    docs = []
    for i, d in enumerate(make_docs(n, max_words=max_words)):
        turns = ({"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."})
        if i % 3 == 1:
            docs.append(Document(text=d.text, messages=turns))
        elif i % 3 == 2:
            docs.append(Document(text=d.text, messages=({"role": "system", "content": "Be brief."}, *turns, *turns)))
        else:
            docs.append(d)
    return docs


def test_prepared_mask_is_the_chat_templates_mask(tmp_path, quiet_prepare):
    tok = get_tokenizer()
    docs = chat_docs(60)
    m = quiet_prepare([ListSource("chat", docs)], tmp_path, shard_tokens=400)
    by_text = {d.rendered(): d for d in docs}
    seen = 0
    for split in ("train", "val"):
        texts = decoded(tmp_path, m, "chat", split)
        for text, mask in zip(texts, shard_masks(tmp_path, m, "chat", split), strict=True):
            doc = by_text[text]
            chat = tok.render_chat(doc.messages).mask if doc.messages else []
            assert mask == [0] * len(tok.encode(doc.text)) + chat + [0]
            seen += 1
    assert seen == 60 and m["version"] == 2


def test_manifest_counts_the_rendered_bytes_of_each_split(tmp_path, quiet_prepare):
    docs = chat_docs(40)
    docs[0] = Document(text="naïve café 東京 🙂")  # multi-byte characters count as their UTF-8 bytes
    m = quiet_prepare([ListSource("a", docs), ListSource("b", make_docs(30, seed=3))], tmp_path)
    for split in ("train", "val"):
        total = 0
        for name in ("a", "b"):
            want = sum(len(t.encode("utf-8")) for t in decoded(tmp_path, m, name, split))
            assert m["sources"][name]["splits"][split]["bytes"] == want
            total += want
        assert m["splits"][split]["bytes"] == total > 0


def test_dataset_from_an_older_format_is_not_prepared_over(tmp_path, quiet_prepare):
    docs = make_docs(20)
    quiet_prepare([ListSource("toy", docs)], tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["version"] = manifest["config"]["version"] = 1
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another tinyllm version: choose a new --out"):
        quiet_prepare([ListSource("toy", docs)], tmp_path)


def test_a_run_that_loses_the_race_for_a_new_out_keeps_the_winners_dataset(tmp_path, quiet_prepare, monkeypatch):
    # Two prepares with other settings started at once into a new --out: both see it missing, the
    # other takes the lock first and finishes, this one is then refused, and must delete nothing.
    import contextlib

    import tinyllm.data.prepare as prepare_module

    out, real_lock = tmp_path / "new" / "ds", prepare_module._exclusive

    @contextlib.contextmanager
    def the_other_run_goes_first(path):
        monkeypatch.setattr(prepare_module, "_exclusive", real_lock)
        quiet_prepare([ListSource("toy", make_docs(30))], out)
        with real_lock(path):
            yield

    monkeypatch.setattr(prepare_module, "_exclusive", the_other_run_goes_first)
    with pytest.raises(UserError, match=r"other settings \(toy max_docs None -> 5\)"):
        quiet_prepare([ListSource("toy", make_docs(30))], out, max_docs=5)
    assert sum(split["documents"] for split in load_manifest(out)["splits"].values()) == 30


def test_a_dataset_prepared_inside_its_source_folder_is_not_read_as_input(tmp_path, quiet_prepare):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"story{i}.txt").write_text(f"Story {i}: the cat sat on the mat.")
    out = corpus / "tokens"  # --source corpus --out corpus/tokens
    first = quiet_prepare(resolve_sources([str(corpus)]), out)
    # Its manifest.json (or an interrupted run's progress.json) is no source file: the same command
    # again is the same dataset (a resume, or here a new weight), not one "with other settings".
    again = quiet_prepare(resolve_sources([f"{corpus}:2"]), out)
    assert again["sources"]["local-corpus"]["weight"] == 2.0
    assert again["sources"]["local-corpus"]["splits"] == first["sources"]["local-corpus"]["splits"]


def test_a_file_deleted_during_a_run_is_one_user_error_naming_it(tmp_path, quiet_prepare, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"story{i}.txt").write_text(f"Story {i}: the cat sat on the mat.")
    (src,) = resolve_sources([str(corpus)])
    listed = src.documents

    def documents(start=0):  # someone moves a file the run has listed but not read yet
        for i, doc in enumerate(listed(start)):
            yield doc
            if i == 0:
                (corpus / "story2.txt").unlink()

    monkeypatch.setattr(src, "documents", documents)
    with pytest.raises(UserError, match=r"story2\.txt is gone: it was deleted or moved while tinyllm prepare read"):
        quiet_prepare([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a first run stopped by its input leaves nothing


@pytest.mark.parametrize("content", ['{"name": "My App", "start_url": "/"}', "[1, 2]", "{broken"])
def test_a_folder_with_another_programs_manifest_json_is_not_called_a_dataset(tmp_path, quiet_prepare, content):
    (tmp_path / "manifest.json").write_text(content)  # a web app's, say: not ours to call stale
    with pytest.raises(UserError, match="is not empty and holds no tinyllm dataset: choose an empty or new") as e:
        quiet_prepare([ListSource("toy", make_docs(5))], tmp_path)
    assert "delete" not in str(e.value)
    assert (tmp_path / "manifest.json").read_text() == content
