"""Multiple-choice tasks in-process: each dataset's exact schema becomes the harness's prompt,
choices are scored the harness's way, and acc / acc_norm are defined as lm-eval defines them."""

from __future__ import annotations

import json

import pytest

from tinyllm.errors import UserError
from tinyllm.eval import tasks
from tinyllm.eval.tasks import (
    Item,
    encode_pair,
    evaluate_task,
    load_items,
    loglikelihood,
    parse_task,
)
from tinyllm.inference.logprobs import token_logprobs
from tinyllm.tokenizer import get_tokenizer

# One record of Rowan/hellaswag's validation split, as the hub has it (a WikiHow item).
HELLASWAG = {
    "ind": 4,
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to clean a grill [title] Heat it.",
    "ctx_b": "then scrub the grates",
    "ctx": "...",
    "endings": ["with a brush [step] Rinse.", "  quickly.", "with soap.", "and stop."],
    "source_id": "wikihow~1",
    "split": "val",
    "split_type": "zeroshot",
    "label": "2",
}
# One record of allenai/ai2_arc ARC-Easy.
ARC = {
    "id": "Mercury_1",
    "question": "Which is a liquid?",
    "choices": {"text": ["ice", "water", "steam"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hellaswag_records_become_the_harness_prompt(tmp_path):
    [item] = load_items("hellaswag", write(tmp_path / "h.jsonl", [HELLASWAG]))
    # lm-eval's preprocess: " [title]" -> ". ", other [brackets] dropped, double spaces closed.
    assert item.context == "Home and Garden: How to clean a grill. Heat it. Then scrub the grates"
    assert item.choices == ("with a brush Rinse.", "quickly.", "with soap.", "and stop.")
    assert item.gold == 2


def test_arc_records_become_the_harness_prompt(tmp_path):
    [item] = load_items("arc_easy", write(tmp_path / "a.jsonl", [ARC]))
    assert item == Item("Question: Which is a liquid?\nAnswer:", ("ice", "water", "steam"), 1)


def test_the_hub_path_asks_for_the_right_dataset_and_split(monkeypatch):
    import datasets

    asked = []

    def fake_load(path, name=None, split=None, **kw):
        asked.append((path, name, split))
        return [HELLASWAG] if path == "Rowan/hellaswag" else [ARC]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_items("hellaswag")[0].gold == 2
    assert load_items("arc_easy")[0].gold == 1
    assert asked == [
        ("Rowan/hellaswag", None, "validation"),
        ("allenai/ai2_arc", "ARC-Easy", "test"),
    ]


def test_an_unreachable_hub_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError(
            "Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"--task hellaswag=PATH"):
        load_items("hellaswag")


def test_a_file_in_the_wrong_schema_names_the_fields(tmp_path):
    with pytest.raises(UserError, match="needs question, choices"):
        load_items("arc_easy", write(tmp_path / "x.jsonl", [HELLASWAG]))


@pytest.mark.parametrize(
    "text, message",
    [
        ("piqa", "unknown task"),
        ("mc", "give --task mc=PATH"),
        ("hellaswag=/no/such.jsonl", "is not a file"),
    ],
)
def test_bad_task_flags_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_task(text)


def test_trailing_spaces_of_the_context_join_the_continuation():
    tok = get_tokenizer()
    context, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert context == tok.encode("Question: why?\nAnswer:")
    assert cont == tok.encode(" because")


def test_a_choice_is_scored_by_its_tokens_given_the_context(tiny_model):
    tok = get_tokenizer()
    ids = tok.encode("The cat sat on the mat")
    n_context = len(tok.encode("The cat sat"))
    want = sum(token_logprobs(tiny_model, ids).logprobs[n_context:])
    assert loglikelihood(tiny_model, tok, "The cat sat", " on the mat") == pytest.approx(
        want, abs=1e-6
    )


def test_acc_takes_the_best_sum_and_acc_norm_divides_by_characters(tiny_model, monkeypatch):
    # "a" scores -2 and "bbbb" -4: the raw sum prefers "a", per character "bbbb" (-1 > -2).
    scores = {" a": -2.0, " bbbb": -4.0}
    monkeypatch.setattr(tasks, "loglikelihood", lambda model, tok, ctx, cont: scores[cont])
    items = [Item("x", ("a", "bbbb"), 1), Item("y", ("a", "bbbb"), 0), Item("z", ("a",), 5)]
    r = evaluate_task(tiny_model, "mc", items)
    assert (r.acc, r.acc_norm, r.items, r.skipped) == (0.5, 0.5, 2, 1)
    r = evaluate_task(tiny_model, "mc", items[:1])
    assert (r.acc, r.acc_norm) == (0.0, 1.0)


def test_a_users_own_task_file(tmp_path, tiny_model):
    path = write(
        tmp_path / "mine.jsonl", [{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}] * 3
    )
    name, file = parse_task(f"mc={path}")
    r = evaluate_task(tiny_model, name, load_items(name, file), max_items=2)
    assert r.items == 2 and r.acc in (0.0, 1.0)


def test_an_empty_context_is_conditioned_on_endoftext_as_the_harness_does(tiny_model):
    # It was a TypeError traceback: the first continuation token has no context, so no logprob.
    tok = get_tokenizer()
    ids = [tok.eot_id, *tok.encode(" blue sky")]
    want = sum(token_logprobs(tiny_model, ids).logprobs[1:])
    assert loglikelihood(tiny_model, tok, "", " blue sky") == pytest.approx(want, abs=1e-6)
    r = evaluate_task(tiny_model, "mc", [Item("", ("blue", "green"), 0), Item("  ", ("red",), 0)])
    assert r.items == 2


def test_a_continuation_longer_than_the_context_is_scored_where_it_fits(tiny_model):
    tok = get_tokenizer()
    long = " word" * 200  # 200 tokens, the model's window 63
    ll = loglikelihood(tiny_model, tok, "A", long)
    ids = (tok.encode("A") + tok.encode(long))[-63:]
    assert ll == pytest.approx(sum(token_logprobs(tiny_model, ids).logprobs[1:]), abs=1e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json\n", r"loading .*bad.jsonl failed \(JSON parse error"),
        ("", r"bad.jsonl has no records"),
        ('{"context": "x", "choices": "blue", "gold": 0}\n', r"choices must be a list of strings"),
    ],
)
def test_a_broken_task_file_is_a_user_error_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_items("mc", path)


def test_a_training_probe_refuses_a_task_given_twice(tmp_path):
    # Both would be logged as mc_acc: the first file's figures lost under the second's.
    first = write(tmp_path / "a.jsonl", [{"context": "a", "choices": ["b"], "gold": 0}])
    second = write(tmp_path / "b.jsonl", [{"context": "c", "choices": ["d"], "gold": 0}])
    with pytest.raises(UserError, match=r"^train.eval_tasks: --task mc=.*b.jsonl: mc is already given"):
        tasks.load_probe([f"mc={first}", f"mc={second}"], 10)
