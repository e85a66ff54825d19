"""--quantize on the commands that load a run: one flag, one loader, one-line errors."""

from __future__ import annotations

import json

import pytest

from tinyllm.cli import build_parser, main
from tinyllm.cli.run_args import load_run
from tinyllm.inference.layout import is_column_major
from tinyllm.inference.quantize import Int8Linear

COMMANDS = {"sample": "sample from", "chat": "chat with", "eval": "evaluate", "serve": "serve"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_loads_the_run_with_int8_weights(tiny_run, command):
    args = build_parser().parse_args([command, "--run", str(tiny_run.path), "--device", "cpu", "--quantize", "int8"])
    model, _, _ = load_run(args, COMMANDS[command])
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert model.head_proj is not None and len(linears) == 4 * model.config.n_layer + 1
    plain = build_parser().parse_args([command, "--run", str(tiny_run.path), "--device", "cpu"])
    default = load_run(plain, COMMANDS[command])[0]  # the weights as trained (laid out for decoding, not rounded)
    assert not any(isinstance(m, Int8Linear) for m in default.modules())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_quantize_value_is_a_one_line_error(tiny_run, command, capsys):
    assert main([command, "--run", str(tiny_run.path), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err == f"tinyllm {command}: error: --quantize int4: choose one of none, int8\n"


def test_sample_streams_with_int8_weights(tiny_run):
    done = tiny_run.tinyllm("sample", "--run", str(tiny_run.path), "--device", "cpu", "--quantize", "int8",
                            "--prompt", "Once", "--temperature", "0", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once") and len(done.stdout) > len("Once\n")


def test_eval_reports_the_int8_loss_within_one_percent(tiny_run):
    runs = {}
    for mode in ("none", "int8"):
        done = tiny_run.tinyllm("eval", "--run", str(tiny_run.path), "--device", "cpu", "--max-batches", "2",
                                "--quantize", mode, "--json")
        assert done.returncode == 0, done.stderr
        runs[mode] = json.loads(done.stdout)
    assert runs["int8"]["tokens"] == runs["none"]["tokens"]  # the same rows
    assert runs["int8"]["loss"] != runs["none"]["loss"]  # the int8 model was scored, not the fp32 one
    assert runs["int8"]["loss"] == pytest.approx(runs["none"]["loss"], rel=0.01)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_that_decode_get_the_decoding_layout_and_export_does_not(tiny_run, command):
    args = build_parser().parse_args([command, "--run", str(tiny_run.path), "--device", "cpu"])
    assert is_column_major(load_run(args, COMMANDS[command])[0].head_weight)
    assert load_run(args, "export", decoding=False)[0].head_weight.is_contiguous()
