"""lm-evaluation-harness, run against a live `tinyllm serve`, scores a HellaSwag-schema task as
`tinyllm eval --task hellaswag=PATH` does in-process.

The task is HellaSwag's own definition (the harness's `process_docs`, prompt and metrics) pointed
at a local JSON-lines file, so nothing is downloaded. The gold ending of each item is the model's
own greedy continuation of the context and the distractors are other items' endings, so the model
scores well above chance (4 of 6 with this seed); each choice's log-likelihood the harness got
through the server must equal tinyllm's in-process one, and so must acc and acc_norm.
"""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval import simple_evaluate  # the [dev] extra's lm_eval[api]
from lm_eval.tasks import TaskManager

from tinyllm.eval.tasks import evaluate_task, load_items, loglikelihood
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.serve import BackgroundServer
from tinyllm.tokenizer import get_tokenizer

CONTEXTS = [
    "The man opens the door",
    "A woman is cooking pasta",
    "Two kids play football",
    "The dog runs across the field",
    "She paints the old fence",
    "He tunes the guitar",
]

TASK_YAML = """\
task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    with torch.no_grad():
        m.head_weight.mul_(20)  # sharpen the random model, so its greedy choice is clear
    return m.eval()


def hellaswag_records(model: GPT) -> list[dict]:
    tok = get_tokenizer()
    greedy = []
    for ctx in CONTEXTS:
        ids = tok.encode(f"Activity: {ctx}.")
        greedy.append(tok.decode(generate(model, ids, 6, temperature=0)).strip())
    records = []
    for i, ctx in enumerate(CONTEXTS):
        others = [greedy[(i + k) % len(greedy)] for k in (1, 2, 3)]
        label = i % 4
        endings = others[:label] + [greedy[i]] + others[label:]
        # Rowan/hellaswag's schema; the harness builds "Activity: ctx_a Ctx_b" from it.
        records.append(
            {
                "ind": i,
                "activity_label": "Activity",
                "ctx_a": f"{ctx}.",
                "ctx_b": "",
                "ctx": f"{ctx}.",
                "endings": endings,
                "source_id": f"test~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": str(label),
            }
        )
    return records


@pytest.mark.slow
def test_the_harness_through_the_server_equals_tinyllm_eval(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hellaswag_records(model)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=data))
    # The harness's own HellaSwag preprocessing, not a copy of it.
    (tasks / "utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
    )

    with BackgroundServer(model, get_tokenizer(), model_name="tiny") as srv:
        out = simple_evaluate(
            model="local-completions",
            # No tokenizer given: the harness finds the server's /tokenize and uses it.
            model_args={
                "base_url": srv.url + "/v1/completions",
                "model": "tiny",
                "max_length": 128,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks=["tiny_hellaswag"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        )
    harness = out["results"]["tiny_hellaswag"]
    ours = evaluate_task(model, "hellaswag", load_items("hellaswag", data))
    assert ours.items == len(CONTEXTS)
    assert harness["acc,none"] == ours.acc
    assert harness["acc_norm,none"] == ours.acc_norm
    assert ours.acc >= 0.5  # chance is 0.25: the model's own continuations mostly win
    tok = get_tokenizer()
    samples = out["samples"]["tiny_hellaswag"]
    assert len(samples) == len(CONTEXTS)
    for sample in samples:
        doc = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]
        want = [loglikelihood(model, tok, doc["query"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
