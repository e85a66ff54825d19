"""`tinyllm bench quality` trains each variant under the same budget on the same corpus and reports
its final val loss against the floor (values checked for sense, never timed)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tinyllm.cli import main


def test_each_variant_trains_and_is_compared_to_the_floor(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "quality", "--preset", "tiny", "--minutes", "10", "--variants", "gpt2,modern-muon",
                     "--set", "train.max_steps=20",
                     "--keep", str(tmp_path / "runs"), "--json"]) == 0
    r = json.loads(out.getvalue())
    assert list(r["variants"]) == ["gpt2", "modern-muon"]
    for name, v in r["variants"].items():
        assert v["steps"] == 20, name  # max_steps: a budget far beyond 20 tiny steps keeps load out of the result
        assert 0 < v["floor"] < v["val_loss"] < 9.0, name  # untrained: ln(50,260) = 10.8
        assert v["gap"] == pytest.approx(v["val_loss"] - v["floor"], abs=1e-3)
        assert (tmp_path / "runs" / name / "metrics.jsonl").is_file()
    assert r["best"] == min(r["variants"], key=lambda n: r["variants"][n]["val_loss"])
    # The modern variant really ran modern blocks with Muon: its saved config says so.
    saved = (tmp_path / "runs" / "modern-muon" / "config.toml").read_text()
    assert 'optimizer = "muon"' in saved and 'pos_emb = "rope"' in saved


def test_a_variant_is_the_same_block_over_any_preset():
    from tinyllm.bench.quality import VARIANTS
    from tinyllm.config import resolve

    for preset in ("cpu", "modern"):  # the GPT-2 block, and a RoPE one with ReLU^2 and no biases
        cfgs = {name: resolve(preset, overrides=[(k, v, name) for k, v in sets.items()]).model
                for name, (_, sets) in VARIANTS.items()}
        assert (cfgs["muon"].pos_emb, cfgs["muon"].norm, cfgs["muon"].mlp, cfgs["muon"].bias) == (
            "learned", "layernorm", "gelu", True)
        assert (cfgs["rope-muon"].pos_emb, cfgs["rope-muon"].qk_norm, cfgs["rope-muon"].mlp) == ("rope", True, "gelu")
        assert (cfgs["modern"].mlp, cfgs["modern"].bias) == ("relu2", False)
        assert (cfgs["muon-doc-256"].n_embd, cfgs["muon-doc-256"].doc_mask) == (256, True)


def test_unknown_variant_is_refused_before_training(capsys):
    assert main(["bench", "quality", "--variants", "gpt2,gpt5"]) == 2
    assert "gpt5" in capsys.readouterr().err


def test_an_earlier_kept_run_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "muon").mkdir()
    assert main(["bench", "quality", "--variants", "gpt2,muon", "--keep", str(tmp_path)]) == 2
    assert "muon already exist" in capsys.readouterr().err


def test_any_prepared_dataset_is_scored_by_a_whole_val_pass(tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"Note {i}: the {w} sat on the mat and looked at the sky."}) + "\n"
                             for i in range(80) for w in ("cat", "dog")))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"Held {i}: a bird sat on the wall by the sea."}) + "\n" for i in range(9)))
    assert main(["prepare", "--source", str(notes), "--val-source", str(held), "--out", str(tmp_path / "ds"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", "quality", "--preset", "tiny", "--minutes", "0.5", "--variants", "gpt2",
                 "--set", "train.max_steps=8", "--data", str(tmp_path / "ds"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    v = r["variants"]["gpt2"]
    assert r["score"] == "val pass" and r["data"] == str((tmp_path / "ds").resolve())
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    held_tokens = manifest["sources"]["local-held"]["splits"]["val"]["tokens"]
    assert v["val_tokens"] == (held_tokens - 1) // 32 * 32  # every packed window of the val split, once
    assert 0 < v["val_loss"] < 11 and 0 < v["bits_per_byte"] < 10
    assert v["floor"] is None and v["gap"] is None  # real text has no floor


def test_a_data_dir_that_is_no_dataset_is_refused_before_training(tmp_path, capsys):
    assert main(["bench", "quality", "--variants", "gpt2", "--data", str(tmp_path)]) == 2
    assert "has no manifest.json: run tinyllm prepare" in capsys.readouterr().err
