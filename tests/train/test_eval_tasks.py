"""`train.eval_tasks`: multiple-choice accuracy logged at every evaluation, equal to `tinyllm eval --task`'s."""

import json

import pytest

from tinyllm.cli import main
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.eval.tasks import evaluate_task, load_items
from tinyllm.runtime.checkpoint import load_model

ITEMS = [
    {"context": "Tom went to the park. Tom", "choices": ["went home.", "a red kite", "Mia."], "gold": 0},
    {"context": "Once upon a time, there was a", "choices": ["little girl", "the of and", "."], "gold": 0},
    {"context": "Mia had a blue ball. The ball was", "choices": ["blue.", "went", "Tom Tom"], "gold": 0},
    {"context": "One day, Ben", "choices": ["felt happy.", "the the", "kite a"], "gold": 1},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def train(run, data, *settings: str) -> int:
    args = ["train", "--preset", "tiny", "--data", data, "--out", str(run), "--max-steps", "4",
            "--eval-every", "2", "--sample-every", "0", "--max-time", "none"]
    for s in settings:
        args += ["--set", s]
    return main(args)


def test_task_accuracy_is_logged_at_every_eval_and_equals_tinyllm_eval(tmp_path, data):
    tasks = tmp_path / "mine.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    run = tmp_path / "run"
    assert train(run, data, f'train.eval_tasks=["mc={tasks}"]', "train.eval_task_items=3") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all("mc_acc" in r and "mc_acc_norm" in r for r in evals)
    # The last eval scored the final weights on the first 3 items, as `tinyllm eval --task` does.
    model, _, _ = load_model(run)
    expected = evaluate_task(model, "mc", load_items("mc", tasks), max_items=3)
    assert evals[-1]["mc_acc"] == round(expected.acc, 4) and evals[-1]["mc_acc_norm"] == round(expected.acc_norm, 4)
    assert "mc acc" in (run / "train_output.txt").read_text()


@pytest.mark.parametrize("setting, message", [
    ('train.eval_tasks=["mc"]', "train.eval_tasks: --task mc: mc reads your own file"),
    ('train.eval_tasks=["nosuch"]', "unknown task 'nosuch'"),
])
def test_a_bad_task_stops_the_run_before_any_step(tmp_path, data, capsys, setting, message):
    run = tmp_path / "run"
    assert train(run, data, setting) == 2
    assert message in capsys.readouterr().err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
