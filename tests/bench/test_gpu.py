"""`tinyllm bench gpu` checks a machine end to end and prints one JSON summary: each part's failure
is recorded there (the command goes on, then exits 1), a missing pytest is said and skipped, and the
killed-and-resumed run continues its losses. Run here with `--device cpu`, as CI does."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from tinyllm.bench import gpu
from tinyllm.cli import main


def plan(tmp_path: Path, **kw) -> gpu.Plan:
    args = argparse.Namespace(device="cpu", quick=True, kill_after=None, checkpoint_every=None,
                              tests=str(kw.pop("tests", tmp_path / "tests")))
    return gpu._plan(args, tmp_path, gpu.time.monotonic())


def run_cli(*argv: str) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "gpu", "--device", "cpu", *argv])
    return code, json.loads(out.getvalue())


def test_a_failing_part_is_recorded_the_rest_run_and_the_command_exits_1(monkeypatch):
    def broken(p):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu, "PARTS", [("first", broken), ("second", lambda p: {"ok": True, "figure": 1.0}),
                                       ("third", lambda p: {"ok": None, "skipped": "not here"})])
    code, summary = run_cli("--quick")
    assert code == 1 and summary["ok"] is False and summary["failed"] == ["first"]
    assert summary["parts"]["first"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert summary["parts"]["second"]["figure"] == 1.0 and summary["parts"]["third"]["ok"] is None
    assert summary["device"] == "cpu" and summary["environment"]["gpu"] is None  # the parts see no GPU


def test_without_pytest_the_tests_part_says_so_and_the_check_goes_on(tmp_path, monkeypatch):
    real = gpu.importlib.util.find_spec
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: None if name == "pytest" else real(name))
    part = gpu._cuda_tests(plan(tmp_path))
    assert part["ok"] is None and "pytest is not installed" in part["skipped"]


def test_the_tests_part_runs_the_cuda_marked_tests_and_reports_a_failure(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_marked.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.cuda
        def test_on_the_gpu():
            assert True

        @pytest.mark.cuda
        def test_broken_on_the_gpu():
            assert False

        def test_unmarked():
            assert False
    """))
    (tests / "test_other.py").write_text("def test_never_collected():\n    assert False\n")
    part = gpu._cuda_tests(plan(tmp_path, tests=tests))
    assert part["ok"] is False and (part["passed"], part["failed"], part["deselected"]) == (1, 1, 1)
    assert "test_broken_on_the_gpu" in part["output"]


def test_the_project_marks_its_cuda_tests():
    tests = Path(__file__).resolve().parents[1]
    marked = [f.name for f in tests.rglob("test_*.py") if "mark.cuda" in f.read_text() and f.name != "test_gpu.py"]
    assert {"test_step.py", "test_process_state.py"} <= set(marked)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path):
    part = gpu._kill_and_resume(plan(tmp_path))
    assert part["ok"] is True, part
    assert part["compared_steps"] >= 3 and part["killed_after_step"] > part["checkpoint_step"]
    assert part["bitwise_equal"] and part["max_relative_difference"] == 0.0  # on a CPU: exactly
    # The resumed run itself trained those steps (a Ctrl-C sent before it started would leave the
    # killed run's own losses to compare with themselves).
    assert f"step {part['killed_after_step']} | loss" in (tmp_path / "killed-run" / "resumed.out").read_text()


@pytest.mark.slow
def test_the_whole_check_runs_on_a_cpu_in_quick_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the checkout: its tests/ is the default
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    code, summary = run_cli("--quick", "--json")
    assert code == 0, json.dumps(summary, indent=1)
    parts = summary["parts"]
    assert list(parts) == ["cuda_tests", "data", "train_eager", "train_compiled", "decode", "kill_and_resume"]
    assert parts["cuda_tests"]["ok"] and parts["cuda_tests"]["skipped"] >= 1  # no GPU: skipped, not failed
    eager = parts["train_eager"]
    assert eager["tokens_per_s"] > 0 and 0 < eager["mfu"] < 1.5 and eager["mfu_peak_source"].startswith("measured")
    assert all(v["peak_gb"] > 0 for v in eager["by_precision"].values())
    assert parts["train_compiled"]["ok"] is None  # compiling on a CPU would take minutes
    assert parts["decode"]["result"]["tokens_per_s"]["kv_cache"]["1"] > 0
    assert parts["kill_and_resume"]["bitwise_equal"]
    assert summary["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_a_kill_just_after_a_save_resumes_from_the_checkpoint_before(tmp_path):
    # A fast run can save again between the check and the SIGKILL: nothing is logged after that newest
    # checkpoint, so the comparison resumes from the one before, whose later steps were logged.
    from tinyllm.bench.killed_run import resume_point

    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    losses = {s: 1.0 / s for s in range(1, 21)}
    assert resume_point(tmp_path, losses).name == "step-00000010"
    assert resume_point(tmp_path, {**losses, 21: 0.05}).name == "step-00000020"
    assert resume_point(tmp_path, {}) is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--kill-after", "-1"], "--kill-after -1: give seconds from 0 to under the 480 s deadline"),
    (["--checkpoint-every", "3"], "--checkpoint-every 3: give more than 3 steps"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: give more than 3 steps"),  # 0 was taken as the default
    (["--tests", "no/such/tests"], "--tests no/such/tests: no such directory"),
])
def test_a_bad_flag_is_refused_before_any_part_runs(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(gpu, "PARTS", [("first", lambda p: pytest.fail("a part ran"))])
    assert main(["bench", "gpu", "--device", "cpu", "--quick", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tinyllm bench: error: {message}") and err.count("\n") == 1
