"""`tinyllm bench gpu`: check a GPU machine end to end in minutes, and say it in one JSON summary.

Why it is shaped this way:
- GPU time comes in minutes, so one command runs everything worth knowing, in an order that puts
  the cheapest verdicts first: the CUDA-marked tests, `bench train` eager and compiled (tokens/s,
  MFU, peak memory), `bench decode`, and a run killed with SIGKILL and resumed. The parts share an
  8-minute deadline (`DEADLINE_S`); on a GPU each gets at most its own share of what is left, so a
  hang costs one part; with --quick only the deadline bounds them (a loaded CI runner is slow).
- Every part is a subprocess of the `tinyllm` this module belongs to (its directory is put first on
  PYTHONPATH), with a timeout, so a crash, a hang or a CUDA error in one part is recorded in the
  summary as that part's failure and the next part still runs; the command exits 1 at the end if
  any part failed. Nothing is downloaded: the parts need the wheel's requirements only, and the
  tests part says so and goes on when pytest (a dev extra) is not installed.
- The kill-and-resume part needs no second, uninterrupted run: the killed run logged the loss of
  each step after its last checkpoint; the resumed run repeats exactly those steps (same data order
  and RNG, restored from the checkpoint), so their losses must agree to `RESUME_TOLERANCE`
  (GPU kernels are not bit-for-bit deterministic; on a CPU they agree exactly).
- `--device cpu` hides the GPUs from the parts (CUDA_VISIBLE_DEVICES=""), so the same command runs
  in CI; `--quick` shrinks every part to the tiny preset and seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinyllm.bench import killed_run
from tinyllm.errors import UserError

HELP = ("check a GPU machine end to end in under 8 minutes (CUDA tests, bench train eager and compiled, "
        "bench decode, a run killed and resumed); one JSON summary")
DEADLINE_S = 480.0  # the whole check, so it fits 10 minutes of device time with the start-up
# The resumed run's loss at each repeated step vs the killed run's, relative. bf16 autocast and
# atomics in GPU backward kernels move the last bits; a real resume bug moves the loss by far more.
RESUME_TOLERANCE = 0.01
TESTS = "tests"  # the CUDA tests, from a checkout
_TAIL = 1500  # characters of a failed part's output kept in the summary


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" or "cpu"
    quick: bool
    preset: str
    train_steps: int  # timed steps of each bench train run
    decode_tokens: int
    kill_after: float  # seconds the run to be killed trains (at least) before SIGKILL
    checkpoint_every: int
    tests: Path
    work: Path
    env: dict
    deadline: float  # time.monotonic() by which every part has ended


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default) checks the GPU; cpu hides it from every part (for CI)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny preset, a few steps and seconds per part (CI); default: the seed preset")
    p.add_argument("--kill-after", type=float, metavar="S",
                   help="seconds the run trains before it is killed (default 120; --quick 0: once it has saved)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="steps between the killed run's checkpoints, over 3 (default 100; --quick 10)")
    p.add_argument("--tests", default=TESTS, metavar="DIR",
                   help="the test tree whose CUDA-marked tests run (default: tests, from a checkout)")


def run(args: argparse.Namespace) -> dict:
    _check(args)  # before any part runs: a typo is one line, not minutes of parts and then a failure
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-gpu-") as work:
        plan = _plan(args, Path(work), started)
        parts: dict[str, dict] = {}
        for name, part in PARTS:
            left = plan.deadline - time.monotonic()
            _say(f"{name} ({left:.0f} s left) ...")
            if left < 5:
                parts[name] = {"ok": False, "error": f"not run: the {DEADLINE_S:.0f} s deadline was reached"}
                continue
            part_started = time.monotonic()
            try:
                parts[name] = part(plan)
            except Exception as e:  # a part's own bug must not lose the summary of the others
                parts[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            parts[name]["seconds"] = round(time.monotonic() - part_started, 1)
            _say(f"{name}: {'ok' if parts[name]['ok'] else 'not run' if parts[name]['ok'] is None else 'FAILED'}")
    return {"ok": all(p["ok"] is not False for p in parts.values()),
            "failed": [name for name, p in parts.items() if p["ok"] is False],
            "device": plan.device, "preset": plan.preset, "quick": args.quick,
            "seconds": round(time.monotonic() - started, 1), "deadline_s": DEADLINE_S,
            "environment": _environment(plan), "parts": parts}


def format(result: dict) -> str:
    return json.dumps(result, indent=1)  # the summary is JSON either way


def _check(args: argparse.Namespace) -> None:
    if args.kill_after is not None and not 0 <= args.kill_after < DEADLINE_S:
        raise UserError(f"--kill-after {args.kill_after:g}: give seconds from 0 to under the {DEADLINE_S:.0f} s deadline")
    if args.checkpoint_every is not None and args.checkpoint_every <= killed_run.MIN_REPEATED:
        raise UserError(f"--checkpoint-every {args.checkpoint_every}: give more than {killed_run.MIN_REPEATED} steps "
                        "(the kill waits for that many steps past a checkpoint, which the resume must repeat)")
    if args.tests != TESTS and not Path(args.tests).is_dir():  # the default is skipped outside a checkout
        raise UserError(f"--tests {args.tests}: no such directory")


def _plan(args: argparse.Namespace, work: Path, started: float) -> Plan:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the usual data cache: prepared once, kept for the next check
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding this tinyllm
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    quick = args.quick
    return Plan(device=args.device, quick=quick, preset="tiny" if quick else "seed", train_steps=1 if quick else 5,
                decode_tokens=8 if quick else 128,
                kill_after=args.kill_after if args.kill_after is not None else (0.0 if quick else 120.0),
                checkpoint_every=args.checkpoint_every if args.checkpoint_every is not None else (10 if quick else 100), tests=Path(args.tests),
                work=work, env=env, deadline=started + DEADLINE_S)


def _environment(plan: Plan) -> dict:
    """What ran: interpreter, torch, and the GPU as the parts see it."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if c else None}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=plan.env, capture_output=True, text=True, timeout=60)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        seen = {"torch": None, "cuda": None, "gpu": None}
    return {"python": platform.python_version(), **seen}


# -- running a part -----------------------------------------------------------------------------


def _timeout(plan: Plan, share: float) -> float:
    """Seconds a part may run: its `share`, within what is left before the deadline."""
    left = plan.deadline - time.monotonic()
    return max(1.0, left if plan.quick else min(share, left))


def _tinyllm(plan: Plan, *argv: str, share: float) -> tuple[dict | None, dict]:
    """`tinyllm ARGV --json` in a subprocess given `share` of the time left: its JSON, or None and
    what went wrong."""
    timeout = _timeout(plan, share)
    cmd = [sys.executable, "-m", "tinyllm", *argv, "--json"]
    try:
        proc = subprocess.run(cmd, env=plan.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return None, {"ok": False, "error": f"timed out after {timeout:.0f} s", "output": _tail(e.stderr)}
    if proc.returncode != 0:
        return None, {"ok": False, "error": f"exit status {proc.returncode}", "output": _tail(proc.stderr)}
    try:
        return json.loads(proc.stdout), {}
    except ValueError:
        return None, {"ok": False, "error": "no JSON on stdout", "output": _tail(proc.stdout + proc.stderr)}


def _say(text: str) -> None:
    print(f"bench gpu: {text}", file=sys.stderr, flush=True)


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-_TAIL:]


# -- the parts ----------------------------------------------------------------------------------


def _cuda_tests(plan: Plan) -> dict:
    """pytest -m cuda over the test tree (skipped tests pass on a machine without a GPU)."""
    if importlib.util.find_spec("pytest") is None:
        return {"ok": None, "skipped": "pytest is not installed (a dev extra): the CUDA tests did not run"}
    if not plan.tests.is_dir():
        return {"ok": None, "skipped": f"no test tree at {plan.tests}: run from a checkout or pass --tests DIR"}
    # Only the files that mark a test: collecting the whole tree imports every test module (slow).
    files = sorted(str(f) for f in plan.tests.rglob("test_*.py") if "mark.cuda" in f.read_text(errors="replace"))
    if not files:
        return {"ok": None, "skipped": f"no test under {plan.tests} is marked cuda"}
    timeout = _timeout(plan, 120.0)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(cmd, env=plan.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "output": _tail(e.stdout)}
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b",
                                                     proc.stdout.splitlines()[-1] if proc.stdout else "")}
    # Exit 5: nothing selected (no CUDA-marked test in this tree); that is no failure.
    ok = proc.returncode in (0, 5)
    return {"ok": ok, "exit_status": proc.returncode, **counts, **({} if ok else {"output": _tail(proc.stdout)})}


def _data(plan: Plan) -> dict:
    """The preset's built-in data, prepared into the cache now (cached: seconds), so that no
    benchmark's timeout is spent tokenizing."""
    code = ("import sys; from tinyllm.config import resolve; from tinyllm.data.dataset import run_dataset; "
            "print(run_dataset(resolve(sys.argv[1]).data))")
    timeout = _timeout(plan, 150.0)
    try:
        proc = subprocess.run([sys.executable, "-c", code, plan.preset], env=plan.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "output": _tail(e.stderr)}
    if proc.returncode != 0:
        return {"ok": False, "error": f"exit status {proc.returncode}", "output": _tail(proc.stderr)}
    return {"ok": True, "dir": proc.stdout.strip().splitlines()[-1]}


def _train(compiled: bool) -> Callable[[Plan], dict]:
    def part(plan: Plan) -> dict:
        if compiled and plan.quick and plan.device == "cpu":
            return {"ok": None, "skipped": "--quick on a CPU: compiling takes minutes there"}
        argv = ["bench", "train", "--preset", plan.preset, "--steps", str(plan.train_steps), "--no-peer"]
        r, failed = _tinyllm(plan, *argv, *(["--compile"] if compiled else []), share=180.0 if compiled else 90.0)
        if r is None:
            return failed
        by = {p: {"tokens_per_s": v["tokens_per_s"], "mfu": v["mfu"],
                  "peak_gb": v.get("peak_cuda_gb", v["peak_rss_gb"]), "warmup_s": round(sum(v["warmup_s"]), 1)}
              for p, v in r["by_precision"].items()}
        return {"ok": True, "precision": r["precision"], "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                "peak_memory": "CUDA allocator peak" if r["device"] == "cuda" else "peak RSS",
                "mfu_peak_flops_per_s": r.get("mfu_peak_flops_per_s"), "mfu_peak_source": r.get("mfu_peak_source"),
                "gpu": r.get("gpu"), "by_precision": by}
    return part


def _decode(plan: Plan) -> dict:
    dtype = "bf16" if plan.device == "cuda" else "fp32"
    r, failed = _tinyllm(plan, "bench", "decode", "--preset", plan.preset, "--device", plan.device, "--dtype", dtype,
                         "--new-tokens", str(plan.decode_tokens), share=90.0)
    return failed if r is None else {"ok": True, "dtype": dtype, "result": r}


def _kill_and_resume(plan: Plan) -> dict:
    return killed_run.check(plan.preset, plan.env, kill_after=plan.kill_after, checkpoint_every=plan.checkpoint_every,
                            run_dir=plan.work / "killed-run", deadline=plan.deadline, tolerance=RESUME_TOLERANCE)


PARTS: list[tuple[str, Callable[[Plan], dict]]] = [
    ("cuda_tests", _cuda_tests),
    ("data", _data),
    ("train_eager", _train(compiled=False)),
    ("train_compiled", _train(compiled=True)),
    ("decode", _decode),
    ("kill_and_resume", _kill_and_resume),
]
