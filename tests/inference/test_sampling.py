"""Sampling knobs restrict the support as documented; generation streams, stops and reproduces."""

from __future__ import annotations

import warnings

import pytest
import torch

from tinyllm.errors import UserError
from tinyllm.inference import generate, sample_next
from tinyllm.model import GPT, GPTConfig

TINY = dict(vocab_size=250, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    # Sharpen the random model so greedy decoding is not decided by float noise.
    with torch.no_grad():
        model.head_weight.mul_(20)
    return model


def draws(logits: torch.Tensor, n: int = 2000, **kw) -> set[int]:
    g = torch.Generator().manual_seed(0)
    rows = logits.expand(n, -1)
    return set(sample_next(rows, generator=g, **kw).tolist())


LOGITS = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 40)
    assert torch.equal(sample_next(logits, temperature=0, top_k=3, top_p=0.1), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.6e-74, 5e-324, 1e-30])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    logits = torch.randn(5, 40) * 10
    for top in ({}, {"top_k": 3}, {"top_p": 0.9}):
        assert torch.equal(sample_next(logits, temperature=temperature, **top), logits.argmax(-1))


def test_a_huge_temperature_samples_every_token():
    assert draws(LOGITS, temperature=1e300, top_k=None) == {0, 1, 2, 3}


def test_unrestricted_sampling_reaches_every_token():
    assert draws(LOGITS, temperature=1.0) == {0, 1, 2, 3}


def test_top_k_restricts_to_the_k_most_likely():
    assert draws(LOGITS, temperature=1.0, top_k=2) == {1, 3}
    assert draws(LOGITS, temperature=5.0, top_k=1) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert draws(LOGITS, temperature=1.0, top_p=0.75) == {1, 3}  # 0.5 + 0.3 >= 0.75
    assert draws(LOGITS, temperature=1.0, top_p=0.79) == {1, 3}
    assert draws(LOGITS, temperature=1.0, top_p=0.81) == {1, 2, 3}
    assert draws(LOGITS, temperature=1.0, top_p=0.01) == {1}  # never empty


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_values_are_user_errors(kw, fragment):
    with pytest.raises(UserError, match=fragment):
        sample_next(LOGITS, **kw)
    with pytest.raises(UserError, match=fragment):
        generate(tiny(), [1], 4, **kw)  # raised at the call, before the first token


@pytest.mark.parametrize("options", [{}, dict(pos_emb="rope"), dict(qk_norm=True, mlp="swiglu")])
def test_greedy_with_cache_equals_full_recomputation(options):
    model = tiny(**options)
    prompt = [5, 17, 42, 8, 99]
    cached = list(generate(model, prompt, 20, temperature=0))
    recomputed = list(generate(model, prompt, 20, temperature=0, use_cache=False))
    assert len(cached) == 20 and cached == recomputed


def test_rope_generation_slides_past_the_context_identically_with_and_without_cache():
    model = tiny(pos_emb="rope", block_size=8)
    cached = list(generate(model, [1, 2, 3], 30, temperature=0))
    recomputed = list(generate(model, [1, 2, 3], 30, temperature=0, use_cache=False))
    assert len(cached) == 30 and cached == recomputed


def test_learned_positions_stop_at_the_context_with_a_warning():
    model = tiny(block_size=8)
    with pytest.warns(UserWarning, match="context"):
        out = list(generate(model, [1, 2, 3], 30, temperature=0))
    assert len(out) == 8 + 1 - 3  # the token after the last position is still predicted


def test_long_prompts_are_cut_from_the_left_with_a_warning():
    model = tiny(pos_emb="rope", block_size=8)
    prompt = list(range(1, 21))
    with pytest.warns(UserWarning, match="keeping its last 8"):
        out = list(generate(model, prompt, 3, temperature=0))
    assert out == list(generate(model, prompt[-8:], 3, temperature=0))


def test_seed_makes_sampling_reproducible():
    model = tiny()
    model.head_weight.data.div_(20)  # a flat distribution, so different seeds differ
    runs = [list(generate(model, [1, 2], 15, seed=s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_torch_cannot_hold_is_a_user_error(seed):
    # It was torch's "ValueError: Overflow when unpacking long long" with a traceback.
    with pytest.raises(UserError, match=f"seed must be an integer .* got {seed}"):
        generate(tiny(), [1, 2], 3, seed=seed)


def test_the_extreme_seeds_torch_holds_are_accepted():
    model = tiny()
    for seed in (2**64 - 1, -(2**63)):
        assert len(list(generate(model, [1, 2], 3, seed=seed))) == 3


def test_stop_id_ends_generation_and_is_not_yielded():
    model = tiny()
    free = list(generate(model, [3, 4], 10, temperature=0))
    stop = free[4]
    out = list(generate(model, [3, 4], 10, temperature=0, stop_ids={stop}))
    assert out == free[: free.index(stop)]


def test_logit_bias_forces_bans_and_checks_its_token_ids():
    model = tiny()
    free = list(generate(model, [3, 4], 6, temperature=0))
    assert list(generate(model, [3, 4], 6, temperature=0, logit_bias={7: 100})) == [7] * 6
    sampled = list(generate(model, [3, 4], 20, temperature=1.0, seed=0, logit_bias={7: 100}))
    assert sampled == [7] * 20
    assert free[0] not in generate(model, [3, 4], 6, temperature=0, logit_bias={free[0]: -100})
    with pytest.raises(UserError, match="logit_bias token id 250"):
        generate(model, [1], 3, logit_bias={250: 1.0})


def test_padded_vocabulary_ids_are_never_sampled():
    model = tiny()  # vocab 250, table padded to 256
    with torch.no_grad():
        # Hidden states all get a large positive mean, so the padded rows (all 100) would win
        # every softmax by a mile if their columns were visible.
        model.ln_f.bias.fill_(1.0)
        model.head_weight[250:] = 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = list(generate(model, [1], 31, temperature=2.0, seed=0))
    assert tokens and max(tokens) < 250


def test_generation_streams_and_restores_training_mode():
    model = tiny().train()
    stream = generate(model, [1, 2], 5, temperature=0)
    assert next(stream) in range(250)  # one token without consuming the rest
    assert not model.training
    stream.close()
    assert model.training


def test_bad_prompts_are_user_errors():
    with pytest.raises(UserError, match="empty"):
        generate(tiny(), [], 3)
    with pytest.raises(UserError, match="vocabulary"):
        generate(tiny(), [1, 250], 3)


def test_draws_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    n = 20000
    drawn = sample_next(LOGITS.expand(n, -1), temperature=1.0, generator=g)
    freq = torch.bincount(drawn, minlength=4).double() / n
    # 3 standard errors of a frequency near 0.5 over 20,000 draws is ~0.011.
    torch.testing.assert_close(freq, LOGITS.exp()[0].double(), atol=0.012, rtol=0)


def test_each_row_can_draw_from_its_own_generator():
    rows = LOGITS.expand(3, -1)
    seeds = (5, 6, 7)
    alone = [int(sample_next(LOGITS, temperature=1.0, generator=torch.Generator().manual_seed(s))[0])
             for s in seeds]
    many = [torch.Generator().manual_seed(s) for s in seeds]
    assert sample_next(rows, temperature=1.0, generator=many).tolist() == alone
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_next(rows, temperature=1.0, generator=many[:2])
