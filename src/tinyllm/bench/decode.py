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
"""

from __future__ import annotations

import argparse
import time

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


def run(args: argparse.Namespace) -> dict:
    import torch  # imported when the benchmark runs, not for --help

    from tinyllm.bench.limits import gemv_bandwidth
    from tinyllm.config import resolve
    from tinyllm.model.gpt import GPT
    from tinyllm.train.device import pick_device

    batches = _batch_sizes(args.batch_sizes)
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
    greedy_decode(model, _prompts(cfg.vocab_size, 1, args.prompt_tokens, device), 2, use_cache=True)  # warm-up
    rates: dict[str, dict[str, float]] = {"kv_cache": {}, "no_cache": {}}
    for b in batches:
        prompts = _prompts(cfg.vocab_size, b, args.prompt_tokens, device)
        for name, use_cache in (("kv_cache", True), ("no_cache", False)):
            seconds = _timed(model, prompts, args.new_tokens, use_cache, device)
            rates[name][str(b)] = round(b * args.new_tokens / seconds, 1)
    result = {
        "preset": args.preset,
        "model": f"{cfg.n_layer} layers x {cfg.n_embd} wide, context {cfg.block_size}, {cfg.pos_emb} positions",
        "parameters": model.num_params(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "tokens_per_s": rates,
        "speedup_kv_cache_by_batch": {b: round(rates["kv_cache"][b] / rates["no_cache"][b], 2) for b in rates["kv_cache"]},
    }
    if "1" in rates["kv_cache"]:
        result["speedup_kv_cache"] = result["speedup_kv_cache_by_batch"]["1"]
        nbytes = weight_bytes_per_token(model)
        bandwidth = gemv_bandwidth(nbytes, dtype, device)
        limit = bandwidth / nbytes
        result.update(weight_bytes_per_token=nbytes, gemv_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                      limit_tokens_per_s=round(limit, 1), mbu=round(rates["kv_cache"]["1"] / limit, 3),
                      speedup_kv_cache_limit=round(limit / rates["no_cache"]["1"], 2))
    return result


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: all of the blocks', the final norm's and the
    head's real rows. (The embedding lookups read one row each: nothing beside these.)"""
    head = model.head_weight[: model.config.vocab_size]
    rest = [*model.blocks.parameters(), *model.ln_f.parameters()]
    return head.numel() * head.element_size() + sum(p.numel() * p.element_size() for p in rest)


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
    from tinyllm.train.device import synchronize

    synchronize(device)
    start = time.perf_counter()
    greedy_decode(model, prompts, new_tokens, use_cache=use_cache)
    synchronize(device)
    return time.perf_counter() - start


def _prompts(vocab_size: int, batch: int, length: int, device):
    import torch

    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes {text}: give comma-separated positive sizes, e.g. 1,8")
    return sizes


def format(result: dict) -> str:
    lines = [f"preset {result['preset']}: {result['model']}, {result['parameters']:,} parameters, random weights, "
             f"{result['dtype']} on {result['device']} ({result['threads']} threads)",
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
    return "\n".join(lines)
