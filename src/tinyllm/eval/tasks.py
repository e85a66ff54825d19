"""Multiple-choice tasks (HellaSwag, ARC-Easy, a user's own JSONL) scored in-process, as the harness does.

Why it is shaped this way:
- Each task is a hub dataset plus a function from one record of its exact schema to an `Item`
  (context, choices, gold), copied from lm-evaluation-harness's task definition (its YAML and
  `utils.py`), so the prompts are the harness's to the character. Local files in the same schema
  load through the same `datasets.load_dataset` call as the hub (`--task hellaswag=PATH`), as the
  data sources do; that is also how the converters are tested offline.
- A choice's score is its continuation's summed log-probability given the context, tokenized the
  harness's way (`_encode_pair`: the context's trailing spaces move to the continuation, the
  continuation's ids are the tail of the whole text's ids) and with no `<|endoftext|>` in front,
  as the harness sends token ids to `tinyllm serve`. Both sides sum `token_logprobs`, so `acc`
  and `acc_norm` here equal the harness's through the server (a test holds them to it).
- `acc` is the share of items whose best-scored choice is the gold one; `acc_norm` divides each
  score by its choice's length in characters first (lm-eval's `acc_norm`); ties go to the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyllm.data.hub_logs import quiet_hub
from tinyllm.errors import UserError
from tinyllm.inference.logprobs import token_logprobs
from tinyllm.model.gpt import GPT
from tinyllm.tokenizer import Tokenizer, get_tokenizer


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]  # each scored as " " + choice after the context (the delimiter)
    gold: int


@dataclass(frozen=True)
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    items: int
    skipped: int = 0  # items whose gold index is outside their choices


def _hellaswag_text(text: str) -> str:
    # lm-eval tasks/hellaswag/utils.py `preprocess`: brackets are WikiHow artifacts.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(r: dict) -> Item:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return Item(
        _hellaswag_text(r["activity_label"] + ": " + ctx),
        tuple(_hellaswag_text(e) for e in r["endings"]),
        int(r["label"]),
    )


def _arc(r: dict) -> Item:
    return Item(
        f"Question: {r['question']}\nAnswer:",
        tuple(r["choices"]["text"]),
        list(r["choices"]["label"]).index(r["answerKey"]),
    )


def _generic(r: dict) -> Item:
    choices = r["choices"]
    # tuple() of a string would silently score its characters as the choices.
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"choices must be a list of strings, got {choices!r:.60}")
    return Item(r["context"], tuple(choices), int(r["gold"]))


@dataclass(frozen=True)
class TaskSpec:
    hub: tuple[str, str | None, str] | None  # (hub id, config, split); None: local files only
    to_item: Callable[[dict], Item]
    fields: str  # the record fields the converter reads, for error messages


TASKS = {
    "hellaswag": TaskSpec(
        ("Rowan/hellaswag", None, "validation"), _hellaswag,
        "activity_label, ctx_a, ctx_b, endings, label",
    ),
    "arc_easy": TaskSpec(
        ("allenai/ai2_arc", "ARC-Easy", "test"), _arc,
        "question, choices {text, label}, answerKey",
    ),
    "mc": TaskSpec(None, _generic, "context, choices, gold"),
}


def parse_task(text: str) -> tuple[str, Path | None]:
    """`NAME` or `NAME=PATH` (a JSON-lines or parquet file in the task's schema)."""
    name, _, path = text.partition("=")
    if name not in TASKS:
        raise UserError(f"--task {text}: unknown task {name!r}; tasks are {', '.join(TASKS)}")
    if not path and TASKS[name].hub is None:
        raise UserError(f"--task {text}: {name} reads your own file: give --task {name}=PATH")
    if path and not Path(path).is_file():
        raise UserError(f"--task {text}: {path} is not a file")
    return name, Path(path) if path else None


def parse_tasks(texts: Iterable[str]) -> list[tuple[str, Path | None]]:
    """Each text as `parse_task` reads it; a name given twice is refused, as its figures would go
    under one key (the report's NAME, the metrics' NAME_acc) and all but the last be lost."""
    tasks: dict[str, tuple[str, Path | None]] = {}
    for text in texts:
        name, path = parse_task(text)
        if name in tasks:
            raise UserError(f"--task {text}: {name} is already given (--task {tasks[name][0]}): give each task "
                            f"once, and score another {name} file with its own tinyllm eval")
        tasks[name] = (text, path)
    return [(name, path) for name, (_, path) in tasks.items()]


def load_items(name: str, path: Path | None = None) -> list[Item]:
    """The task's items, from the hub or from a local file in the same schema."""
    import datasets
    from datasets.exceptions import DatasetGenerationError, DatasetsError

    spec = TASKS[name]
    where = str(path) if path else f"{spec.hub[0]} on the Hugging Face hub"
    try:
        if path is None:
            hub_id, config, split = spec.hub
            with quiet_hub():  # no "Retrying..." lines before the one-line error offline
                records: Iterable[dict] = datasets.load_dataset(hub_id, config, split=split)
        else:
            builder = "parquet" if path.suffix == ".parquet" else "json"
            with quiet_hub(progress_bars=False):  # a local file: no bars, a bad one said once
                records = datasets.load_dataset(builder, data_files=[str(path)], split="train")
        return [spec.to_item(r) for r in records]
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--task {name}: {where} is not in {name}'s schema (needs {spec.fields}; "
                        f"{type(e).__name__}: {e})") from None
    except StopIteration:  # how datasets' json builder meets a file with no records
        raise UserError(f"--task {name}: {where} has no records: give one JSON object per line") from None
    except (OSError, ValueError, DatasetsError) as e:  # no network, unknown dataset, bad file
        # A file that does not parse is a DatasetGenerationError ("An error occurred while generating the
        # dataset") whose cause says what and where: "JSON parse error: Invalid value. in row 0".
        e = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = f"; offline, give --task {name}=PATH, a local file in its schema" if path is None else ""
        raise UserError(f"--task {name}: loading {where} failed ({first}){hint}") from None


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces join the continuation; its ids end the whole's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    context_ids = tok.encode(context)
    return context_ids, whole[len(context_ids) :]


def loglikelihood(model: GPT, tok: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the context cut from the left to fit the model's context.

    Cut to one token less than the context, as the harness cuts (`max_length - 1`: it asks the
    server for one generated token too) when given the run's context as `max_length`.
    """
    context_ids, cont_ids = encode_pair(tok, context, continuation)
    if not context_ids:  # the harness's empty context: <|endoftext|>, so the first token is scored too
        context_ids, cont_ids = [tok.eot_id], tok.encode(context + continuation)
    ids = (context_ids + cont_ids)[-(model.config.block_size - 1) :]
    scores = token_logprobs(model, ids)
    # A continuation longer than the window is scored on the tokens that have context in it (not
    # the first, whose logprob is None).
    return sum(scores.logprobs[max(1, len(ids) - len(cont_ids)) :])


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as np.argmax


def evaluate_task(model: GPT, name: str, items: Iterable[Item], max_items: int | None = None) -> TaskResult:
    """acc and acc_norm over the items (the first `max_items` of them if given)."""
    tok = get_tokenizer()
    correct = correct_norm = scored = skipped = 0
    for item in _first(items, max_items):
        if not 0 <= item.gold < len(item.choices):
            skipped += 1
            continue
        lls = [loglikelihood(model, tok, item.context, " " + c) for c in item.choices]
        correct += _argmax(lls) == item.gold
        # An empty choice: numpy's ll / 0 is -inf in the harness, never the argmax.
        norm = [ll / len(c) if c else float("-inf") for ll, c in zip(lls, item.choices, strict=True)]
        correct_norm += _argmax(norm) == item.gold
        scored += 1
    if not scored:
        raise UserError(f"--task {name}: no items to score" + (f" ({skipped} with a gold index "
                        "outside their choices)" if skipped else ""))
    return TaskResult(name, correct / scored, correct_norm / scored, scored, skipped)


def _first(items: Iterable[Item], n: int | None) -> Iterator[Item]:
    for i, item in enumerate(items):
        if n is not None and i >= n:
            return
        yield item


Probe = list[tuple[str, list[Item]]]  # (task name, its first items), scored during training


def load_probe(specs: Sequence[str], max_items: int) -> Probe:
    """The first `max_items` items of each task in `specs` (as `--task` takes them), loaded once
    when a run starts, so a bad spec stops it before any step (`train.eval_tasks`)."""
    if specs and max_items < 1:
        raise UserError(f"train.eval_task_items is {max_items}: score at least 1 item of each task")
    try:
        return [(name, list(_first(load_items(name, path), max_items))) for name, path in parse_tasks(specs)]
    except UserError as e:
        raise UserError(f"train.eval_tasks: {e}") from None


def probe_record(model: GPT | None, probe: Probe) -> dict[str, float]:
    """Each task's accuracy as metrics: NAME_acc and NAME_acc_norm; none without a model (the
    ranks other than 0 of a data-parallel run, which only help gather it)."""
    record: dict[str, float] = {}
    if model is None:
        return record
    for name, items in probe:
        r = evaluate_task(model, name, items)
        record[f"{name}_acc"], record[f"{name}_acc_norm"] = round(r.acc, 4), round(r.acc_norm, 4)
    return record

