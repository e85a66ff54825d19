"""`tinyllm bench quality`: val loss reached in equal wall-clock time, per architecture and optimizer.

Why it is shaped this way:
- Speed per token is half of training speed; what a token buys is the other half. So each variant
  trains the way `tinyllm train` does (the `cpu` preset, the trainer itself, the schedule fitted to
  the same time budget) on the same prepared built-in corpus, and the figure is its final val loss
  against the corpus's exact entropy floor. Only the variant's own `--set` keys differ.
- Variants run one after another in this process, never side by side: they would share the cores.
  Each run's log goes to its own run directory (kept with --keep), so a curve can be looked at.
- Data preparation is done once before the first variant and counts against none.
- `--data DIR` compares the recipes on any prepared dataset (real text, a user's own): the score
  is then one whole pass over DIR's val split after training (`evaluate_loss`, every val row
  once, outside the budget), in nats/token and bits per byte, against a floor only if the data
  has one. The trainer's own val loss is a fixed budget of rows, fine for a curve but a sample;
  on the built-in corpus the figure stays that, as before.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tinyllm.errors import UserError

HELP = ("final val loss in equal wall-clock time, vs the corpus floor or on any prepared --data: GPT-2 recipe, "
        "modern blocks, Muon")

# name -> (what it is, --set overrides on the preset). Each names its whole block, so a variant
# means the same whatever the preset's own block is.
_GPT2 = {"model.pos_emb": "learned", "model.norm": "layernorm", "model.qk_norm": False, "model.mlp": "gelu",
         "model.bias": True, "model.doc_mask": False}
_ROPE = {**_GPT2, "model.pos_emb": "rope", "model.norm": "rmsnorm", "model.qk_norm": True}
_MODERN = {**_ROPE, "model.mlp": "relu2", "model.bias": False}
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt2": ("the classic GPT-2 recipe: learned positions, LayerNorm, GELU, AdamW", {**_GPT2, "optim.optimizer": "adamw"}),
    "modern": ("RoPE, RMSNorm, QK-norm, ReLU^2, no biases; AdamW", {**_MODERN, "optim.optimizer": "adamw"}),
    "muon": ("the GPT-2 blocks; Muon for block matrices, AdamW for the rest", {**_GPT2, "optim.optimizer": "muon"}),
    "muon-doc": ("muon, each document of a row seen alone (model.doc_mask)",
                 {**_GPT2, "model.doc_mask": True, "optim.optimizer": "muon"}),
    "muon-doc-256": ("muon-doc 256 wide, the cpu preset's width before it became 128",
                     {**_GPT2, "model.doc_mask": True, "optim.optimizer": "muon", "model.n_embd": 256}),
    "rope-muon": ("RoPE, RMSNorm, QK-norm (GELU, biases); Muon", {**_ROPE, "optim.optimizer": "muon"}),
    "modern-muon": ("modern blocks and Muon", {**_MODERN, "optim.optimizer": "muon"}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="the base recipe every variant starts from (default cpu)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per variant (default 10)")
    p.add_argument("--variants", default=",".join(VARIANTS), metavar="A,B",
                   help=f"which variants, comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override applied to every variant (e.g. train.dtype=fp32); repeatable")
    p.add_argument("--keep", metavar="DIR", help="keep each variant's run directory under DIR (default: discarded)")
    p.add_argument("--data", metavar="DIR", help="a dataset made by tinyllm prepare to compare on; each variant is "
                   "scored by a whole pass over its val split (default: the built-in corpus, scored by the "
                   "trainer's final val loss against its floor)")


def run(args: argparse.Namespace) -> dict:
    from tinyllm.config import parse_set, resolve
    from tinyllm.data.dataset import run_dataset
    from tinyllm.train.run_plan import fit_width, width_given

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if not args.minutes > 0:
        raise UserError(f"--minutes must be positive, got {args.minutes}")
    common = [(k, v, "--set") for k, v in map(parse_set, args.set)]
    if args.data:
        from tinyllm.data.manifest import load_manifest

        load_manifest(args.data)  # a missing or foreign dataset fails before any minutes are spent
        common.append(("data.dir", str(Path(args.data).resolve()), "--data"))
    budget = f"{args.minutes * 60:.0f}s"
    configs = {}
    for name in names:  # resolve all first: a bad --set fails before any minutes are spent
        variant = [(k, v, f"variant {name}") for k, v in VARIANTS[name][1].items()]
        overrides = [*variant, *common, ("train.max_time", budget, "--minutes"),
                     ("train.budget_drives_schedule", True, "--minutes"), ("train.sample_every", 0, "bench quality")]
        configs[name] = resolve(args.preset, overrides=overrides)
        if not width_given(None, overrides):  # the width `tinyllm train` would train here
            configs[name] = fit_width(configs[name])[0]
    if args.keep:
        taken = [str(Path(args.keep) / n) for n in names if (Path(args.keep) / n).exists()]
        if taken:
            raise UserError(f"--keep: {', '.join(taken)} already exist; name an empty directory")
    first = configs[names[0]]
    if not first.data.dir:
        _say("preparing the built-in corpus (cached after the first run) ...")
    data_dir = run_dataset(first.data)
    results = {}
    full_pass = bool(first.data.dir)  # a prepared dataset: score a whole pass over its val split
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-quality-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name in names:
            configs[name].data.dir = str(data_dir)
            results[name] = _train(name, configs[name], root / name, full_pass)
    return {"preset": args.preset, "minutes": args.minutes, "threads": _threads(),
            "data": str(data_dir) if full_pass else "builtin", "score": "val pass" if full_pass else "trainer val loss",
            "variants": results, "best": min(results, key=lambda n: results[n]["val_loss"]),
            "load_avg_end": round(os.getloadavg()[0], 2)}


def _train(name: str, cfg, run_dir: Path, full_pass: bool) -> dict:
    from tinyllm.runtime.device import keep_freed_memory
    from tinyllm.train.trainer import Trainer

    _say(f"{name}: {VARIANTS[name][0]}; {cfg.train.max_time} ...")
    load = os.getloadavg()[0]
    started = time.monotonic()
    trainer = Trainer(cfg, run_dir, echo=False)
    if trainer.device.type == "cpu":  # as `tinyllm train` does for its process: variants train alike
        keep_freed_memory()
    result = trainer.run()
    seconds = time.monotonic() - started
    params = trainer.model.num_params()
    loss, floor, bpb, scored = result.val_loss, result.floor, None, None
    if full_pass:
        _say(f"{name}: scoring a whole pass over {cfg.data.dir}'s val split ...")
        scored = _val_pass(trainer, cfg)
        loss, floor, bpb = scored.loss, scored.floor, scored.bits_per_byte
    out = {"description": VARIANTS[name][0], "parameters": params, "steps": result.steps, "tokens": result.tokens,
           "seconds": round(seconds, 1), "val_loss": round(loss, 4),
           "floor": floor, "gap": round(loss - floor, 4) if floor else None,
           "bits_per_byte": None if bpb is None else round(bpb, 4), "val_tokens": scored.tokens if scored else None,
           "precision": "bf16" if trainer.amp is not None else "fp32", "load_avg_start": round(load, 2)}
    _say(f"{name}: val loss {out['val_loss']:.4f} after {out['steps']} steps ({out['tokens']:,} tokens)")
    return out


def _val_pass(trainer, cfg):  # -> tinyllm.eval.EvalResult
    """Every val row of the run's dataset once, as `tinyllm eval` scores it (the model as trained)."""
    from tinyllm.eval import evaluate_loss

    return evaluate_loss(trainer.model, cfg.data.dir, split="val", batch_size=cfg.train.micro_batch,
                         context=cfg.model.block_size, device=trainer.device, autocast_dtype=trainer.amp,
                         mode=cfg.data.mode, loss_on=cfg.data.loss_on)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _say(text: str) -> None:
    print(f"bench quality: {text}", file=sys.stderr, flush=True)


def format(r: dict) -> str:
    scored = ("the trainer's final val loss (nats/token)" if r["score"] == "trainer val loss" else
              f"a whole pass over {r['data']}'s val split (nats/token, bits/byte)")
    lines = [f"preset {r['preset']}, {r['minutes']:g} minutes per variant, {r['threads']} threads; score: {scored}", "",
             f"{'variant':<13}{'steps':>7}{'tokens':>11}{'val loss':>10}{'bits/B':>8}{'floor':>8}{'gap':>8}"
             f"{'precision':>10}{'load':>6}  what"]
    for name, v in r["variants"].items():
        floor, gap, bpb = (f"{v[k]:.4f}" if v[k] is not None else "-" for k in ("floor", "gap", "bits_per_byte"))
        lines.append(f"{name:<13}{v['steps']:>7}{v['tokens']:>11,}{v['val_loss']:>10.4f}{bpb:>8}{floor:>8}{gap:>8}"
                     f"{v['precision']:>10}{v['load_avg_start']:>6.1f}  {v['description']}")
    lines += ["", f"best: {r['best']}"]
    return "\n".join(lines)
