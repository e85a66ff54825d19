"""`tinyllm eval` finds the run's own data, agrees with the val loss training logged, and reports
the figures a user compares runs by."""

from __future__ import annotations

import json
import math

import tinyllm.eval
from tinyllm.cli import main
from tinyllm.data.loader import TokenLoader
from tinyllm.eval import qa_accuracy
from tinyllm.runtime.checkpoint import load_model, read_config


def last_logged_val_loss(run) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]["val_loss"]


def test_eval_gives_the_val_loss_training_logged(tiny_run):
    cfg = read_config(tiny_run.path)
    eval_batches = cfg.train.eval_batches
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--max-batches", str(eval_batches), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert abs(report["loss"] - last_logged_val_loss(tiny_run.path)) < 1e-4
    # It read the built-in corpus the run trained on, from the cache the run used.
    assert report["data"].startswith(tiny_run.env["TINYLLM_CACHE"])
    # Packed rows of model.block_size tokens: the budget's, or the whole val split when it is smaller.
    val = TokenLoader(report["data"], "val", cfg.train.micro_batch, cfg.model.block_size, sequential=True)
    rows = sum(val.eval_rows(eval_batches * cfg.train.micro_batch).values())
    assert report["tokens"] == rows * cfg.model.block_size and 0 < rows <= eval_batches * cfg.train.micro_batch
    assert math.isclose(report["perplexity"], math.exp(report["loss"]))
    assert 0 < report["bits_per_byte"] < report["loss"] / math.log(2)  # > 1 byte per token
    assert 0 < report["floor"] < report["loss"] and math.isclose(report["gap"], report["loss"] - report["floor"])


def test_whole_split_report_for_a_person(tiny_run):
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path))
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert set(lines) == {"checkpoint", "data", "val loss", "perplexity", "bits per byte", "tokens", "corpus floor"}
    assert "one whole pass" in lines["data"] and "nats/token" in lines["val loss"]
    assert int(lines["tokens"].replace(",", "")) > 4 * 8 * 32


def test_qa_accuracy_on_held_out_questions(tiny_run):
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--max-batches", "1", "--qa", "3", "--json")
    assert r.returncode == 0, r.stderr
    qa = json.loads(r.stdout)["qa"]
    expected = qa_accuracy(load_model(tiny_run.path)[0], json.loads(r.stdout)["data"], max_questions=3)
    assert qa == {"correct": expected.correct, "total": 3, "accuracy": expected.accuracy, "skipped": expected.skipped}


def test_mistakes_are_one_line_errors(tiny_run, tmp_path):
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--data", str(tmp_path), "--max-batches", "1")
    assert r.returncode == 2 and "tinyllm prepare" in r.stderr and "Traceback" not in r.stderr
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--max-batches", "0")
    assert r.returncode == 2 and "--max-batches must be at least 1" in r.stderr
    r = tiny_run.tinyllm("eval")
    assert r.returncode == 2 and "give --run RUN_DIR" in r.stderr


def test_qa_on_data_without_questions_is_refused_before_the_loss_pass(tiny_run, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("The cat sat on the mat by the door. " * 200)
    data = tmp_path / "notes"
    assert main(["prepare", "--source", str(notes), "--out", str(data), "--quiet"]) == 0

    def loss_pass(*args, **kwargs):
        raise AssertionError("the loss pass ran before --qa's data was checked")

    monkeypatch.setattr(tinyllm.eval, "evaluate_loss", loss_pass)
    assert main(["eval", "--run", str(tiny_run.path), "--data", str(data), "--qa", "3"]) == 2
    assert "has no builtin source" in capsys.readouterr().err


def test_a_mix_is_reported_per_source_and_in_total(tiny_run, tmp_path):
    notes = tmp_path / "notes.jsonl"
    # Notes long enough that the val split holds whole rows of the run's 128 tokens.
    notes.write_text("".join(json.dumps({"text": f"Note {i}: " + "the cat sat on the mat by the door. " * 4}) + "\n"
                             for i in range(40)))
    data = tmp_path / "mix"
    r = tiny_run.tinyllm("prepare", "--source", "builtin", "--source", f"{notes}:3", "--max-tokens", "8000",
                         "--out", str(data), "--quiet")
    assert r.returncode == 0, r.stderr
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    sources = report["sources"]
    assert list(sources) == ["builtin", "local-notes"]
    assert report["tokens"] == sum(s["tokens"] for s in sources.values())
    by_tokens = sum(s["loss"] * s["tokens"] for s in sources.values()) / report["tokens"]
    assert math.isclose(report["loss"], by_tokens, rel_tol=1e-9)
    assert sources["builtin"]["floor"] is not None and sources["local-notes"]["floor"] is None
    text = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--data", str(data)).stdout
    assert "its 2 sources together" in text and "\nby source:\n" in text
    assert f"  local-notes: {sources['local-notes']['loss']:.4f} nats/token" in text


def test_eval_task_scores_a_multiple_choice_file(tiny_run, tmp_path):
    items = [{"context": "Tom has a", "choices": ["kite.", "the the the"], "gold": 0}] * 2
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--task", f"mc={path}", "--json")
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)["tasks"]["mc"]
    assert task["items"] == 2 and task["acc"] in (0.0, 1.0) and task["acc_norm"] in (0.0, 1.0)
    text = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--task", f"mc={path}")
    assert text.returncode == 0 and "mc: acc " in text.stdout and "(2 items)" in text.stdout


def test_eval_task_errors_are_one_line(tiny_run):
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--task", "mc")
    assert r.returncode == 2 and "give --task mc=PATH" in r.stderr and "Traceback" not in r.stderr


def test_a_task_file_loads_quietly_and_a_broken_one_is_one_line(tiny_run, tmp_path):
    # datasets printed its progress bars, and for a broken file its own log line, before ours.
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"context": "Tom has a", "choices": ["kite.", "dog."], "gold": 0}\n')
    bad.write_text("not json\n")
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--task", f"mc={good}")
    assert r.returncode == 0 and r.stderr == ""
    r = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--task", f"mc={bad}")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"tinyllm eval: error: --task mc: loading {bad} failed (JSON parse error: Invalid value. in row 0)"]


def test_a_task_given_twice_is_refused_before_anything_is_scored(tmp_path, capsys):
    # The second mc file's figures replaced the first's under "mc", the first scored for nothing.

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (first, second):
        f.write_text('{"context": "a", "choices": ["b"], "gold": 0}\n')
    assert main(["eval", "--run", str(tmp_path / "no-run"), "--task", f"mc={first}", "--task", f"mc={second}"]) == 2
    assert capsys.readouterr().err == (f"tinyllm eval: error: --task mc={second}: mc is already given (--task "
                                       f"mc={first}): give each task once, and score another mc file with its own "
                                       "tinyllm eval\n")


def test_flags_the_chosen_report_would_ignore_are_refused(tmp_path, capsys):
    # They were silently ignored: `--task mc=F --qa 5` printed no QA figure and no word why.

    task = tmp_path / "mine.jsonl"
    task.write_text('{"context": "a", "choices": ["b"], "gold": 0}\n')
    for extra, flag in ((["--qa", "5"], "--qa"), (["--split", "train"], "--split"),
                        (["--max-batches", "2"], "--max-batches"), (["--data", str(tmp_path)], "--data")):
        assert main(["eval", "--run", str(tmp_path), "--task", f"mc={task}", *extra]) == 2
        err = capsys.readouterr().err
        assert err == (f"tinyllm eval: error: {flag} does not apply with --task, which scores the tasks instead of "
                       f"the loss: drop {flag}, or run tinyllm eval once for each\n")
    assert main(["eval", "--run", str(tmp_path), "--max-items", "3"]) == 2
    assert "--max-items applies only with --task" in capsys.readouterr().err


def test_one_batch_reads_as_one_batch():
    from tinyllm.cli.eval import format_report

    report = {"checkpoint": "c", "data": "d", "split": "val", "batch_size": 8, "context": 32, "loss_on": "all",
              "loss": 5.0, "perplexity": 148.4, "bits_per_byte": 2.0, "tokens": 256, "floor": None, "sources": {}}
    assert "(val split, 1 batch's worth of 8 x 32 tokens)" in format_report({**report, "max_batches": 1})
    assert "(val split, 2 batches' worth of 8 x 32 tokens)" in format_report({**report, "max_batches": 2})
