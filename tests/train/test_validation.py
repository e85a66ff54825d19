"""The run's validation loss: the same rows every time, scored as `tinyllm eval` scores them.
(Under torchrun the ranks share the scoring: `test_distributed` compares the curves.)"""

import pytest
import torch

from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.data.loader import TokenLoader
from tinyllm.eval.loss import evaluate_loss
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.train.distributed import Dist
from tinyllm.train.validation import fixed_batches, val_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def test_the_validation_rows_are_fixed_and_score_as_tinyllm_eval_does(data):
    def val(seed: int) -> TokenLoader:
        return TokenLoader(data, "val", 2, 16, seed=seed, sequential=True)

    first, again = fixed_batches(val(0), 3, torch.device("cpu")), fixed_batches(val(7), 3, torch.device("cpu"))
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    ours = val_loss(model, model, first, Dist(), torch.device("cpu"), None)
    theirs = evaluate_loss(model, data, batch_size=2, context=16, max_batches=3)
    assert ours.loss == pytest.approx(theirs.loss, abs=1e-6) and ours.tokens == theirs.tokens == 3 * 2 * 16
