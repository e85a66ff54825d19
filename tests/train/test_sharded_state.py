"""The optimizer state FSDP2 gathers (keyed by parameter name) and the one torch.optim writes
(keyed by index) translate into each other, so a sharded run's checkpoint is an ordinary one.
Gathering itself needs a process group: `test_distributed` trains with FSDP2 and reads it back."""

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.train.optim import build_optimizer
from tinyllm.train.sharded_state import _by_index, _by_name, _param_names


def stepped_optimizer() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = build_optimizer(model, resolve("tiny").optim, torch.device("cpu"))
    x = torch.randint(0, 256, (2, 8))
    model(x, x).backward()
    optimizer.step()
    return model, optimizer


def test_index_keyed_state_survives_the_round_trip_through_names():
    model, optimizer = stepped_optimizer()
    names = _param_names(model, optimizer)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_index = optimizer.state_dict()
    by_name = _by_name(by_index, names)
    assert set(by_name["state"]) <= set(names) and by_name["param_groups"][0]["params"][0] in names
    back = _by_index(by_name, names)
    assert back["param_groups"] == by_index["param_groups"]
    assert back["state"].keys() == by_index["state"].keys()
    for i, state in by_index["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in state.items() if torch.is_tensor(v))


def test_state_of_another_model_is_refused_with_the_fix():
    model, optimizer = stepped_optimizer()
    with pytest.raises(UserError, match="does not fit this model's parameters.*resume from a checkpoint of this model"):
        _by_name(optimizer.state_dict(), _param_names(model, optimizer)[:3])
