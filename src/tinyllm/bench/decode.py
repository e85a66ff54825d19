"""`tinyllm bench decode`: greedy decoding speed with and without the KV cache, at batch 1 and 8.

Why it is shaped this way:
- Speed does not depend on what the weights are, so the model is a preset's architecture with
  seeded random weights: nothing to train first, and the figure is that of the preset's size.
- Every row of a batch gets its own random prompt of the same length, so a batch needs no
  padding: each step is one forward of [B, T] with a KV cache of batch B (rows of different
  lengths would need per-row positions and masks, which the model does not have). That loop is
  `greedy_decode`; at batch 1 it gives exactly `generate(temperature=0)`'s tokens (the tests hold
  it to that), so the batch-1 figure is what `sample` and `chat` get.
- Without the cache each step runs the whole sequence so far and only its last position through
  the head, as `generate(use_cache=False)` does: the cost the cache saves.
- At batch 1 a cached step reads every weight once for 2 FLOPs each: memory bandwidth bounds it.
  `limit_tokens_per_s` is the GEMV bandwidth (limits.gemv_bandwidth, on as many bytes as the
  weights) over the weights' bytes; `mbu` is the cached rate over it, and
  `speedup_kv_cache_limit` is that limit over the rate without the cache: the most the cache
  can give at batch 1 on this machine, whatever the code does.
- One short untimed decode first (first-call allocations, kernel selection); then each setting
  runs once. tokens/s counts the new tokens of every row: batch * new_tokens / seconds.
- The prompt and the new tokens must fit the context: learned positions end there, and the
  cache is sized to it.
- `--quantize int8` measures the int8 model (`tinyllm.inference.quantize`) and, beside it, the
  same weights in the --dtype at batch 1 with the cache: `speedup_int8` is int8 over that. Its
  `mbu` counts the int8 bytes. Quality needs trained weights, so it comes from `--run`: the
  run's val loss int8 over unquantized on the same rows (`int8_val_loss_ratio`, rows cut as
  `tinyllm eval` cuts them, --quality-batches batches), and the share of prompts (openings of
  val rows, each decoded alone at batch 1 as `sample` does) whose first --match-tokens greedy
  tokens are the same (`int8_greedy_match`). Without --run these are null.
"""

from __future__ import annotations

import argparse
import time

from tinyllm.bench import positive_ints
from tinyllm.cli.run_args import add_quantize_argument, check_quantize
from tinyllm.errors import UserError

HELP = "greedy decoding tokens/s with and without the KV cache, batch 1 and 8, for a preset's model size"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="seed", help="whose model size to measure, random weights (default seed: 8 x 512)")
    p.add_argument("--prompt-tokens", type=int, default=16, metavar="N", help="prompt length per row (default 16)")
    p.add_argument("--new-tokens", type=int, default=256, metavar="N", help="tokens generated per row (default 256)")
    p.add_argument("--batch-sizes", default="1,8", metavar="LIST", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run the model (default auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights and KV cache precision (default fp32, what sample/chat/serve use)")
    p.add_argument("--threads", type=int, metavar="N", help="PyTorch CPU threads (default: PyTorch's, one per core); "
                   "on a machine shared with other jobs 1 can be many times faster than all cores")
    add_quantize_argument(p)
    p.add_argument("--run", metavar="RUN_DIR", help="with --quantize int8: a trained run to measure int8's quality on "
                   "(val loss ratio, greedy agreement); speed is still measured at --preset's size")
    p.add_argument("--quality-batches", type=int, default=4, metavar="N",
                   help="val batches (of the run's micro-batch) scored for int8_val_loss_ratio (default 4)")
    p.add_argument("--prompts", type=int, default=32, metavar="N", help="prompts for int8_greedy_match (default 32)")
    p.add_argument("--match-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens that must agree for a prompt to count in int8_greedy_match (default 16)")


def run(args: argparse.Namespace) -> dict:
    import torch  # imported when the benchmark runs, not for --help

    from tinyllm.config import resolve
    from tinyllm.inference.layout import decode_layout
    from tinyllm.inference.quantize import quantize_int8
    from tinyllm.model.gpt import GPT
    from tinyllm.runtime.device import pick_device

    batches = positive_ints("--batch-sizes", args.batch_sizes, "sizes", "1,8")
    check_quantize(args.quantize)
    if args.run is not None:
        _check_run(args)  # before the speed runs: a wrong path is one line at once, not after minutes
    for flag in ("quality_batches", "prompts", "match_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = resolve(args.preset).model
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        raise UserError("--prompt-tokens and --new-tokens must be at least 1")
    if args.prompt_tokens + args.new_tokens > cfg.block_size:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed preset "
                        f"{args.preset}'s context of {cfg.block_size} tokens: ask for fewer")
    device = pick_device(args.device)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    reference = None
    if args.quantize == "int8":
        reference = GPT(cfg).to(device=device, dtype=dtype).eval()
        reference.load_state_dict(model.state_dict())
        quantize_int8(model)
        decode_layout(reference)
    decode_layout(model)  # as sample/chat/serve load it; after quantize_int8 it changes nothing
    rates = _rates(model, batches, args.prompt_tokens, args.new_tokens, device)
    result = {
        "preset": args.preset,
        "model": f"{cfg.n_layer} layers x {cfg.n_embd} wide, context {cfg.block_size}, {cfg.pos_emb} positions",
        "parameters": model.num_params(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "quantize": args.quantize,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "tokens_per_s": rates,
        "speedup_kv_cache_by_batch": {b: round(rates["kv_cache"][b] / rates["no_cache"][b], 2) for b in rates["kv_cache"]},
    }
    if "1" in rates["kv_cache"]:
        result["speedup_kv_cache"] = result["speedup_kv_cache_by_batch"]["1"]
        result.update(_bandwidth_limit(model, dtype, device, rates))
    if reference is not None:
        prompts = _prompts(cfg.vocab_size, 1, args.prompt_tokens, device)
        int8 = rates["kv_cache"].get("1") or args.new_tokens / _timed(model, prompts, args.new_tokens, True, device)
        unquantized = args.new_tokens / _timed(reference, prompts, args.new_tokens, True, device)
        result.update(unquantized_tokens_per_s=round(unquantized, 1), speedup_int8=round(int8 / unquantized, 2),
                      **int8_quality(args, device))
    return result


def _rates(model, batches: list[int], prompt_tokens: int, new_tokens: int, device) -> dict[str, dict[str, float]]:
    """Tokens/s with and without the KV cache at each batch size, after a warm-up decode."""
    vocab = model.config.vocab_size
    greedy_decode(model, _prompts(vocab, 1, prompt_tokens, device), 2, use_cache=True)  # warm-up
    rates: dict[str, dict[str, float]] = {"kv_cache": {}, "no_cache": {}}
    for b in batches:
        prompts = _prompts(vocab, b, prompt_tokens, device)
        for name, use_cache in (("kv_cache", True), ("no_cache", False)):
            seconds = _timed(model, prompts, new_tokens, use_cache, device)
            rates[name][str(b)] = round(b * new_tokens / seconds, 1)
    return rates


def _bandwidth_limit(model, dtype, device, rates: dict[str, dict[str, float]]) -> dict:
    """Batch 1's decode against the bound set by reading every weight once per token (see the docstring)."""
    from tinyllm.bench.limits import gemv_bandwidth
    from tinyllm.inference.quantize import weight_bytes

    nbytes = weight_bytes(model)
    bandwidth = gemv_bandwidth(nbytes, dtype, device)
    limit = bandwidth / nbytes
    return dict(weight_bytes_per_token=nbytes, gemv_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                limit_tokens_per_s=round(limit, 1), mbu=round(rates["kv_cache"]["1"] / limit, 3),
                speedup_kv_cache_limit=round(limit / rates["no_cache"]["1"], 2))


def _check_run(args: argparse.Namespace) -> None:
    from tinyllm.runtime.checkpoint import find_checkpoint, read_config

    if args.quantize != "int8":
        raise UserError("--run scores int8's quality on a trained run: add --quantize int8")
    context = read_config(find_checkpoint(args.run)).model.block_size
    if args.match_tokens >= context:
        raise UserError(f"--match-tokens {args.match_tokens} leave no room for a prompt in the run's context "
                        f"of {context} tokens: ask for fewer")


def int8_quality(args: argparse.Namespace, device) -> dict:
    """int8_val_loss_ratio and int8_greedy_match of --run (null without one); see the docstring."""
    if not args.run:
        return {"int8_val_loss_ratio": None, "int8_greedy_match": None, "quality_run": None}
    import torch

    from tinyllm.data.dataset import trained_dataset
    from tinyllm.data.loader import TokenLoader
    from tinyllm.eval import evaluate_loss
    from tinyllm.inference.quantize import quantize_int8
    from tinyllm.runtime.checkpoint import load_model

    reference, cfg, ckpt = load_model(args.run, device)
    int8 = quantize_int8(load_model(args.run, device)[0])
    data = trained_dataset(cfg.data)
    rows = dict(split="val", batch_size=cfg.train.micro_batch, context=cfg.model.block_size,
                max_batches=args.quality_batches, mode=cfg.data.mode, loss_on=cfg.data.loss_on)
    ratio = evaluate_loss(int8, data, **rows).loss / evaluate_loss(reference, data, **rows).loss
    length = min(args.prompt_tokens, cfg.model.block_size - args.match_tokens)
    loader = TokenLoader(data, "val", args.prompts, length, mode="packed")
    prompts = next(iter(loader.eval_pass(args.prompts)))[1].inputs  # [n, length]
    same = 0
    for row in prompts.to(device):
        a, b = (greedy_decode(m, row[None], args.match_tokens, use_cache=True) for m in (reference, int8))
        same += bool(torch.equal(a, b))
    return {"int8_val_loss_ratio": round(ratio, 4), "int8_greedy_match": round(same / len(prompts), 3),
            "int8_greedy_prompts": len(prompts), "quality_run": str(ckpt)}


def greedy_decode(model, prompts, new_tokens: int, *, use_cache: bool):
    """Greedy continuations [B, new_tokens] of equal-length prompts [B, P], all rows at once."""
    import torch

    with torch.no_grad():
        cache = model.make_kv_cache(batch_size=prompts.shape[0]) if use_cache else None
        seq, feed = prompts, prompts  # feed: what the next forward sees
        for _ in range(new_tokens):
            logits = model(feed, kv_cache=cache, last_only=True)[:, -1, :]  # [B, V]
            nxt = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            seq = torch.cat([seq, nxt], dim=1)
            feed = nxt if use_cache else seq
        return seq[:, prompts.shape[1]:]


def _timed(model, prompts, new_tokens: int, use_cache: bool, device) -> float:
    from tinyllm.runtime.device import synchronize

    synchronize(device)
    start = time.perf_counter()
    greedy_decode(model, prompts, new_tokens, use_cache=use_cache)
    synchronize(device)
    return time.perf_counter() - start


def _prompts(vocab_size: int, batch: int, length: int, device):
    import torch

    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def format(result: dict) -> str:
    int8 = " with int8 weights" if result["quantize"] == "int8" else ""
    lines = [f"preset {result['preset']}: {result['model']}, {result['parameters']:,} parameters, random weights, "
             f"{result['dtype']}{int8} on {result['device']} ({result['threads']} threads)",
             f"greedy decoding of {result['new_tokens']} new tokens after a {result['prompt_tokens']}-token prompt:"]
    for b, with_cache in result["tokens_per_s"]["kv_cache"].items():
        without = result["tokens_per_s"]["no_cache"][b]
        lines.append(f"  batch {b:>3}: {with_cache:>9,.1f} tokens/s with the KV cache, {without:>9,.1f} without "
                     f"({result['speedup_kv_cache_by_batch'][b]}x)")
    if "mbu" in result:
        lines.append(f"batch 1 is bound by memory: a token reads {result['weight_bytes_per_token'] / 1e6:,.0f} MB of "
                     f"weights, a GEMV reads {result['gemv_bandwidth_gb_s']} GB/s -> at most "
                     f"{result['limit_tokens_per_s']:,.1f} tokens/s; the cache reaches {result['mbu']:.0%} of it "
                     f"(mbu), and no cache could beat recomputation by more than {result['speedup_kv_cache_limit']}x")
    if "speedup_int8" in result:
        lines.append(f"int8: {result['speedup_int8']}x the {result['dtype']} weights' "
                     f"{result['unquantized_tokens_per_s']:,.1f} tokens/s at batch 1 with the cache")
        if result["quality_run"]:
            lines.append(f"int8 on {result['quality_run']}: val loss {result['int8_val_loss_ratio']}x the unquantized; "
                         f"first greedy tokens the same on {result['int8_greedy_match']:.0%} of "
                         f"{result['int8_greedy_prompts']} prompts")
        else:
            lines.append("int8 quality (val loss ratio, greedy agreement): give --run RUN_DIR, a trained run")
    return "\n".join(lines)
