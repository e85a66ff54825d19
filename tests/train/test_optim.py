"""Parameter groups, AdamW and Muon + AdamW."""

import copy
from dataclasses import replace

import pytest
import torch

from tinyllm.config import OptimConfig
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.train.optim import build_optimizer, param_groups
from tinyllm.train.schedule import LRSchedule


def tiny_gpt(**kw) -> GPT:
    return GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, **kw))


def names_in(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kw", [{}, {"norm": "rmsnorm", "bias": False, "tie_embeddings": False, "qk_norm": True}])
def test_only_matrices_are_decayed(kw):
    model = tiny_gpt(**kw)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed, plain = names_in(model, decay), names_in(model, no_decay)
    assert not decayed & plain
    assert decayed | plain == {n for n, _ in model.named_parameters()}
    assert "wte.weight" in plain  # embeddings (and a tied head with them) are not decayed
    assert all(n.endswith("weight") and "ln" not in n and "norm" not in n for n in decayed)
    assert all(p.dim() >= 2 for p in decay["params"])
    if not kw.get("tie_embeddings", True):
        assert "lm_head.weight" in decayed  # an untied head is an ordinary matrix


def test_tied_head_is_counted_once():
    model = tiny_gpt()
    groups = param_groups(model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()


def test_optimizer_is_fused_on_cpu_when_asked():
    opt = build_optimizer(tiny_gpt(), OptimConfig(fused=True), torch.device("cpu"))
    assert opt.defaults["fused"] is True
    opt = build_optimizer(tiny_gpt(), OptimConfig(fused=False), torch.device("cpu"))
    assert not opt.defaults["fused"]


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = tiny_gpt(tie_embeddings=False)
    opt = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    muon = {n for g in opt.muon.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    adamw = {n for g in opt.adamw.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert muon and not muon & adamw
    assert muon | adamw == {n for n, _ in model.named_parameters()}
    assert all(n.startswith("blocks.") and n.endswith("weight") and "ln" not in n for n in muon)
    assert {"wte.weight", "wpe.weight", "lm_head.weight"} <= adamw  # input/output layers stay on AdamW
    opt.param_groups[0]["lr"] = 0.123  # the schedule sets lr through the shared groups
    assert opt.muon.param_groups[0]["lr"] == 0.123


def _fit(model, opt, steps: int, x, y) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_learns_and_resumes_exactly():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (4, 8))
    y = torch.roll(x, -1, dims=1)
    cfg = OptimConfig(optimizer="muon", lr=3e-3)
    model = tiny_gpt()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    losses = _fit(model, opt, 20, x, y)
    assert losses[-1] < losses[0] - 1.0

    # Stop after 10 steps, load model and optimizer state into fresh objects, go on: same path.
    torch.manual_seed(1)
    a = tiny_gpt()
    opt_a = build_optimizer(a, cfg, torch.device("cpu"))
    _fit(a, opt_a, 10, x, y)
    b = tiny_gpt()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg, torch.device("cpu"))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from disk: no tensors shared with a
    assert _fit(a, opt_a, 5, x, y) == _fit(b, opt_b, 5, x, y)


def test_adamw_state_does_not_load_into_muon():
    model = tiny_gpt()
    adamw = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    muon = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    with pytest.raises(ValueError, match="optim.optimizer"):
        muon.load_state_dict(adamw.state_dict())


def test_adamw_half_of_muon_gets_its_own_multiple_of_the_lr():
    model = tiny_gpt()
    cfg = OptimConfig(optimizer="muon", lr=1e-3, adamw_lr_scale=2.0, warmup_steps=0, schedule="constant")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    LRSchedule(cfg, 10).apply(opt, 1)
    muon = {n: g["lr"] for g in opt.muon.param_groups for n in names_in(model, g)}
    adamw = {n: g["lr"] for g in opt.adamw.param_groups for n in names_in(model, g)}
    assert set(muon.values()) == {1e-3} and set(adamw.values()) == {2e-3}
    assert {"wte.weight", "wpe.weight"} <= adamw.keys()  # the tied head is wte
    # At 1 the groups hold nothing new, so state dicts are as before the option existed.
    plain = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    assert all("lr_scale" not in g for g in plain.param_groups)


def test_a_scaled_adamw_lr_resumes_exactly_and_the_config_decides_the_scale():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (4, 8))
    y = torch.roll(x, -1, dims=1)
    cfg = OptimConfig(optimizer="muon", lr=3e-3, adamw_lr_scale=4.0, warmup_steps=0, schedule="constant")
    a = tiny_gpt()
    opt_a = build_optimizer(a, cfg, torch.device("cpu"))
    LRSchedule(cfg, 20).apply(opt_a, 1)
    _fit(a, opt_a, 5, x, y)
    b = tiny_gpt()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg, torch.device("cpu"))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    assert _fit(a, opt_a, 5, x, y) == _fit(b, opt_b, 5, x, y)
    other = build_optimizer(tiny_gpt(), replace(cfg, adamw_lr_scale=1.0), torch.device("cpu"))
    other.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a resume that changed the setting
    assert all("lr_scale" not in g for g in other.param_groups)


def test_adamw_alone_takes_one_rate_whatever_adamw_lr_scale_says():
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, adamw_lr_scale=2.0, warmup_steps=0, schedule="constant")
    opt = build_optimizer(tiny_gpt(), cfg, torch.device("cpu"))
    LRSchedule(cfg, 10).apply(opt, 1)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
