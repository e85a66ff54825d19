"""`tinyllm bench train`: training tokens/s and MFU, against the machine's limits and a common peer.

Why it is shaped this way:
- One run measures the limits (`bench.limits`: square GEMMs and the model's own shapes), the training
  rates, then the limits again, so MFU and speedup are ratios from one sitting; load only slows, so
  each limit is the best of its two passes (both reported, with the load average before and after).
- The tinyllm side is the trainer's own step, `Trainer._train_step` (model, fused loss, the preset's
  optimizer, autocast, clipping) on the preset's data, one micro-batch per step, in the precision
  `train.dtype = "auto"` picks here and in the other one; nothing of the loop is rewritten here.
- The peers are what people commonly run (`bench.peers`): transformers' `GPT2LMHeadModel`, and the
  same model written the obvious way in one file (nanoGPT-style), at the same dimensions and
  micro-batch, torch's AdamW with the same clipping, fp32, eager.
- Each side trains in its own subprocess, so its peak memory is its own: the child reads its
  VmHWM (ru_maxrss can carry the parent's peak over into a child started by vfork + exec). The
  data is prepared (and cached) by the parent first, so tokenizing is no part of any peak.
- Two warm-up steps go untimed: the first steps touch cold memory and run several times slower,
  and with --compile they compile (reported apart). The rate is the median timed step: another
  process's burst slows one step, not the median.
- MFU counts model FLOPs as nanoGPT and PaLM do: `GPT.flops_per_token()` (6 x matmul weights +
  attention) x tokens/s. Rates in the JSON are FLOP/s, not GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tinyllm.errors import UserError

HELP = ("training tokens/s and MFU vs the machine's matmul limits, and vs Hugging Face GPT-2 and a plain PyTorch "
        "GPT in plain loops")
WARMUP_STEPS = 2  # cold memory: the first steps run several times slower
PRECISIONS = ("fp32", "bf16")
_GB = 1e9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="seed", help="whose model and data to train (default seed: 8 x 512, context 512)")
    p.add_argument("--micro-batch", type=int, metavar="B",
                   help="rows per step, for tinyllm and the peer alike (default: the preset's train.micro_batch)")
    p.add_argument("--steps", type=int, default=3, metavar="N",
                   help=f"timed steps per run, after {WARMUP_STEPS} untimed warm-up steps (default 3)")
    p.add_argument("--no-peer", action="store_true",
                   help="skip the peer runs (Hugging Face GPT2LMHeadModel and the plain PyTorch GPT)")
    p.add_argument("--compile", action="store_true",
                   help="run tinyllm under torch.compile (default: eager, whatever the preset says); the warm-up "
                   "(compilation included) is reported apart")


def run(args: argparse.Namespace) -> dict:
    from tinyllm.bench.limits import model_gemms
    from tinyllm.bench.peaks import mfu_peaks
    from tinyllm.config import resolve
    from tinyllm.runtime.device import pick_device

    if args.steps < 1 or (args.micro_batch is not None and args.micro_batch < 1):
        raise UserError("--steps and --micro-batch must be at least 1")
    if not args.no_peer and _missing("transformers"):
        raise UserError("the peer run needs transformers: pip install 'tinyllm[export]' (or transformers), or pass --no-peer")
    cfg = resolve(args.preset)
    batch = args.micro_batch or cfg.train.micro_batch
    device = pick_device(cfg.train.device)
    load_before = os.getloadavg()
    _prepare_data(cfg)
    chosen = _auto_precision(device)
    gemms = model_gemms(cfg.model, batch, cfg.model.block_size)
    measured = _measure_limits(gemms, device, "before")
    spec = {"preset": args.preset, "micro_batch": batch, "steps": args.steps, "compile": args.compile}
    ours = {p: _in_subprocess({**spec, "side": "tinyllm", "precision": p}) for p in (chosen, _other(chosen))}
    peer = None if args.no_peer else _in_subprocess({**spec, "side": "peer", "precision": "fp32"})
    plain = None if args.no_peer else _in_subprocess({**spec, "side": "plain", "precision": "fp32"})
    limits = _limit_figures(_measure_limits(gemms, device, "after", measured), device)
    fpt, (peaks, peak_info) = ours[chosen]["flops_per_token"], mfu_peaks(device, limits)  # GPU: vendor bf16 peak
    for p, r in ours.items():
        r["model_flops_per_s"] = _sig(r["tokens_per_s"] * fpt)
        r["mfu"] = round(r["tokens_per_s"] * fpt / peaks[p], 4)
        r["mfu_shapes"] = round(r["tokens_per_s"] * fpt / limits[f"shape_limit_{p}"], 4)
    main = ours[chosen]
    return {
        "preset": args.preset,
        "model": f"{cfg.model.n_layer} layers x {cfg.model.n_embd} wide, context {cfg.model.block_size}",
        "parameters": main["parameters"],
        "device": device.type,
        "threads": main["threads"],
        "micro_batch": batch, "context": cfg.model.block_size, "warmup_steps": WARMUP_STEPS, "steps": args.steps,
        **peak_info,
        "compile": args.compile,
        "flops_per_token": fpt,
        **limits,
        "shape_limit": limits[f"shape_limit_{chosen}"],
        "precision": chosen,
        "preset_dtype": cfg.train.dtype,
        **{k: main[k] for k in ("tokens_per_s", "model_flops_per_s", "mfu", "mfu_shapes", "peak_rss_gb")},
        "by_precision": {p: {k: v for k, v in r.items() if k not in _SHARED} for p, r in ours.items()},
        **_peer_figures("peer", peer, main, fpt, limits["square_limit_fp32"]),
        **_peer_figures("plain", plain, main, fpt, limits["square_limit_fp32"]),
        "allocator": main["allocator"],
        "ld_preload": main["ld_preload"],
        "load_avg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }


_SHARED = ("parameters", "threads", "flops_per_token", "allocator", "ld_preload")  # the same in every run


def _auto_precision(device) -> str:
    """What train.dtype = "auto" picks on this device."""
    import torch

    from tinyllm.runtime.device import autocast_dtype

    return "bf16" if autocast_dtype(device, "auto") is torch.bfloat16 else "fp32"


def _measure_limits(gemms: list, device, when: str, earlier: dict | None = None) -> dict:
    """Square and shape limits in both precisions, measured before and again after the training runs.

    Other processes only ever slow a measurement down, so each limit keeps the best of its passes;
    every pass's figure is kept too, to show how much the load moved.
    """
    import torch

    from tinyllm.bench.limits import faster_of, shape_limit, square_limit

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    _say(f"matmul limits {when} training: square, then the model's GEMM shapes ...")
    passes = earlier["passes"] if earlier else {f"{kind}_{p}": [] for kind in ("square", "shape") for p in PRECISIONS}
    square, shapes = {}, {}
    for p in PRECISIONS:
        square[p] = square_limit(dtypes[p], device)
        shapes[p] = shape_limit(gemms, dtypes[p], device)
        passes[f"square_{p}"].append(_sig(square[p]))
        passes[f"shape_{p}"].append(_sig(shapes[p].flops_per_s))
        if earlier:
            square[p] = max(square[p], earlier["square"][p])
            shapes[p] = faster_of(shapes[p], earlier["shapes"][p])
    return {"square": square, "shapes": shapes, "passes": passes}


def _limit_figures(measured: dict, device) -> dict:
    from tinyllm.bench.limits import square_size

    shapes = measured["shapes"]
    return {
        "square_size": square_size(device),
        **{f"square_limit_{p}": _sig(measured["square"][p]) for p in PRECISIONS},
        **{f"shape_limit_{p}": _sig(shapes[p].flops_per_s) for p in PRECISIONS},
        "shape_limit_parts": {p: {part: {"flops_per_s": _sig(v["flops_per_s"]), "flop_share": round(v["flop_share"], 4)}
                                  for part, v in shapes[p].by_part().items()} for p in PRECISIONS},
        "limit_passes": measured["passes"],  # before and after training, FLOP/s
    }


def _peer_figures(side: str, peer: dict | None, main: dict, fpt: float, fp32_limit: float) -> dict:
    """side "peer" (Hugging Face) or "plain": its run and tinyllm's speed and memory against it."""
    if peer is None:
        return {side: None, f"{side}_tokens_per_s": None, f"{side}_mfu": None, f"speedup_vs_{side}": None,
                f"speedup_vs_{side}_cpu": None, f"{side}_peak_rss_gb": None}
    return {
        side: {k: v for k, v in peer.items() if k not in ("threads", "allocator", "ld_preload", "flops_per_token")},
        f"{side}_tokens_per_s": peer["tokens_per_s"],
        f"{side}_mfu": round(peer["tokens_per_s"] * fpt / fp32_limit, 4),
        f"speedup_vs_{side}": round(main["tokens_per_s"] / peer["tokens_per_s"], 3),
        # per CPU-second: what the ratio would be on a quiet machine, whatever else ran meanwhile
        f"speedup_vs_{side}_cpu": (round(main["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"], 3)
                                   if "tokens_per_cpu_s" in peer else None),
        f"{side}_peak_rss_gb": peer["peak_rss_gb"],
    }


def _other(precision: str) -> str:
    return "bf16" if precision == "fp32" else "fp32"


def _sig(x: float) -> float:
    """Four significant digits: more would claim a precision the timings do not have."""
    return float(f"{x:.4g}")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _say(text: str) -> None:
    print(f"bench train: {text}", file=sys.stderr, flush=True)


def _prepare_data(cfg) -> None:
    """Prepare the built-in corpus into its cache now, so no child's peak memory includes it."""
    if not cfg.data.dir:
        from tinyllm.data.dataset import run_dataset

        _say("preparing the preset's built-in data (cached after the first run) ...")
        run_dataset(cfg.data)


# -- one side, in a subprocess ----------------------------------------------------------------------


def _in_subprocess(spec: dict) -> dict:
    """Run `child_main` on spec in a fresh interpreter; its figures come back through a file."""
    label = f"{spec['side']} {spec['precision']}"
    _say(f"{label}: {WARMUP_STEPS} warm-up + {spec['steps']} timed steps of {spec['micro_batch']} rows ...")
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        code = "from tinyllm.bench.train import child_main; child_main()"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(out)], stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.is_file():
            why = (f"was killed by signal {-proc.returncode} (out of memory? try a smaller --micro-batch)"
                   if proc.returncode < 0 else f"failed with exit status {proc.returncode}; its error is above")
            raise UserError(f"the {label} training run {why}")
        return json.loads(out.read_text())


def child_main() -> None:
    """A measuring subprocess: argv is [spec as JSON, path to write the figures to]."""
    from tinyllm.bench.peers import hf_step, plain_step

    os.dup2(2, 1)  # anything a library prints goes to stderr; the parent's stdout stays its own
    spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-run-") as run_dir:
        step, info = {"tinyllm": _tinyllm_step, "peer": hf_step, "plain": plain_step}[spec["side"]](spec, Path(run_dir))
        warmup_s, step_s, cpu_s = _time_steps(step, spec["steps"], info.pop("device"), f"{spec['side']} {spec['precision']}")
    cuda = info.pop("cuda")
    result = {
        "precision": spec["precision"],
        "tokens_per_s": round(info["tokens_per_step"] / statistics.median(step_s), 1),
        "step_s": [round(s, 3) for s in step_s],
        "warmup_s": [round(s, 3) for s in warmup_s],
        **_memory(cuda),
        **info,
    }
    if not cuda:  # CPU-seconds of all threads: other processes taking the cores barely move it
        result["tokens_per_cpu_s"] = round(info["tokens_per_step"] / statistics.median(cpu_s), 1)
        result["cpu_s"] = [round(s, 3) for s in cpu_s]
    out.write_text(json.dumps(result))


def _time_steps(step: Callable[[], float | None], steps: int, device, label: str) -> tuple[list[float], ...]:
    """Wall seconds of the warm-up steps and of the timed steps, and CPU seconds of the timed steps."""
    from tinyllm.runtime.device import synchronize

    wall, cpu = [], []
    for i in range(WARMUP_STEPS + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step()
        synchronize(device)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        kind = "warm-up" if i < WARMUP_STEPS else "timed"
        print(f"  {label}: {kind} step {i + 1}: {wall[-1]:.2f} s ({cpu[-1]:.2f} CPU-s), loss {loss}",
              file=sys.stderr, flush=True)
    return wall[:WARMUP_STEPS], wall[WARMUP_STEPS:], cpu[WARMUP_STEPS:]


def _tinyllm_step(spec: dict, run_dir: Path) -> tuple[Callable[[], float | None], dict]:
    """The trainer's own optimizer step, one micro-batch each, nothing else (no eval, samples, saves)."""
    from tinyllm.config import resolve
    from tinyllm.runtime.device import keep_freed_memory, use_tf32
    from tinyllm.train.trainer import Trainer

    settings = {"micro_batch": spec["micro_batch"], "grad_accum": 1, "batch_tokens": 0, "dtype": spec["precision"],
                "compile": spec["compile"], "max_steps": WARMUP_STEPS + spec["steps"], "max_time": "",
                "fit_steps_to_time": False, "eval_every": 0, "eval_batches": 1, "sample_every": 0,
                "checkpoint_every": 0}
    cfg = resolve(spec["preset"], overrides=[(f"train.{k}", v, "tinyllm bench train") for k, v in settings.items()])
    trainer = Trainer(cfg, run_dir, echo=False)
    if trainer.device.type == "cpu":  # as `tinyllm train` sets its process; the steps bypass `run`
        keep_freed_memory()
    use_tf32(trainer.device, spec["precision"])
    info = {"parameters": trainer.model.num_params(), "flops_per_token": trainer.model.flops_per_token(),
            "tokens_per_step": trainer.tokens_per_step, "device": trainer.device,
            "cuda": trainer.device.type == "cuda", "compile": spec["compile"]}
    return (lambda: (trainer._train_step(), trainer._read_steps()[0])[1]), info  # the loss read: a sync, as timed


def _memory(cuda: bool) -> dict:
    """Peak RSS of this process (and the CUDA allocator's peak), plus the malloc in use."""
    import torch

    figures = {"peak_rss_gb": round(_peak_rss_bytes() / _GB, 3)}
    if cuda:
        figures["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / _GB, 3)
    return {**figures, "threads": torch.get_num_threads(), "allocator": allocator(),
            "ld_preload": os.environ.get("LD_PRELOAD", "")}


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss, in bytes on macOS, KiB elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def allocator() -> str:
    """The malloc this process runs on: a preloaded or linked jemalloc/tcmalloc/mimalloc, else glibc."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return "system (unknown)"
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    if "libc.so" not in maps and "libc-" not in maps:
        return "system (unknown)"
    from tinyllm.runtime.device import keep_freed_memory

    return "glibc, freed memory kept" if keep_freed_memory.cache_info().currsize and keep_freed_memory() else "glibc"


# -- for a person -----------------------------------------------------------------------------------


def format(r: dict) -> str:
    g = 1e9
    passes, size = r["limit_passes"], r["square_size"]
    square = f"  square {size} x {size}"
    lines = [
        f"preset {r['preset']}: {r['model']}, {r['parameters'] / 1e6:.1f}M parameters; micro-batch {r['micro_batch']} "
        f"x {r['context']}; {r.get('gpu') or r['device']}, {r['threads']} threads, allocator {r['allocator']}",
        f"load average {r['load_avg']['before'][0]:.1f} before, {r['load_avg']['after'][0]:.1f} after; "
        f"model FLOPs per token {r['flops_per_token'] / 1e6:.1f}M (6 x matmul weights + attention); mfu vs "
        f"{r.get('mfu_peak_source')}" + (f" {r['mfu_peak_flops_per_s'] / 1e12:.1f} TFLOP/s" if r.get("gpu") else ""),
        "",
        f"{'machine limit, GFLOP/s (best of 2 passes)':<44}{'fp32':>9}{'bf16':>9}",
        f"{square:<44}"
        f"{r['square_limit_fp32'] / g:>9.1f}{r['square_limit_bf16'] / g:>9.1f}",
        f"{'  at the model GEMM shapes':<44}{r['shape_limit_fp32'] / g:>9.1f}{r['shape_limit_bf16'] / g:>9.1f}",
    ]
    parts = r["shape_limit_parts"]
    for part, v in parts["fp32"].items():
        label = f"    {part} ({v['flop_share']:.0%} of FLOPs)"
        lines.append(f"{label:<44}{v['flops_per_s'] / g:>9.1f}{parts['bf16'][part]['flops_per_s'] / g:>9.1f}")
    lines.append("  passes (before, after): square " + ", ".join(
        f"{p} {' / '.join(f'{x / g:.0f}' for x in passes[f'square_{p}'])}" for p in PRECISIONS))
    warm = "warm-up s (compile)" if r["compile"] else "warm-up s"
    lines += ["", f"{'training':<26}{'tokens/s':>9}{'tok/CPU-s':>11}{'GFLOP/s':>9}{'mfu':>7}{'mfu_shapes':>12}"
                  f"{'peak RSS GB':>13}{warm:>21}"]
    for p, v in r["by_precision"].items():
        lines.append(_row(f"tinyllm {p}" + (" (auto)" if p == r["precision"] else ""), v, r["flops_per_token"],
                          v["mfu"], v["mfu_shapes"]))
    sides = [(side, label) for side, label in (("peer", "peer: HF GPT-2 fp32"), ("plain", "peer: plain PyTorch fp32"))
             if r.get(side) is not None]
    for side, label in sides:
        lines.append(_row(label, r[side], r["flops_per_token"], r[f"{side}_mfu"],
                          r[f"{side}_tokens_per_s"] * r["flops_per_token"] / r["shape_limit_fp32"]))
    lines += [""] if sides else []
    for side, _ in sides:
        cpu = f", {r[f'speedup_vs_{side}_cpu']:.2f}x per CPU-second" if r[f"speedup_vs_{side}_cpu"] else ""
        lines.append(f"tinyllm ({r['precision']}) vs {r[side]['name']}: {r[f'speedup_vs_{side}']:.2f}x tokens/s{cpu} "
                     f"(attention {r[side]['attn_implementation']})")
    return "\n".join(lines)


def _row(name: str, v: dict, flops_per_token: float, mfu: float, mfu_shapes: float) -> str:
    per_cpu = f"{v['tokens_per_cpu_s']:,.0f}" if "tokens_per_cpu_s" in v else "-"
    return (f"{name:<26}{v['tokens_per_s']:>9,.0f}{per_cpu:>11}{v['tokens_per_s'] * flops_per_token / 1e9:>9.1f}"
            f"{mfu:>7.3f}{mfu_shapes:>12.3f}{v['peak_rss_gb']:>13.2f}{sum(v['warmup_s']):>21.1f}")
