"""An exported folder loads in transformers offline and computes what tinyllm computes.

Each exportable option combination gets a tiny model (width 32, two layers, the real 50,260-token
vocabulary so the real tokenizer fits) with every parameter randomised, norm weights and biases
included, so a dropped, swapped or mis-laid weight shows in the logits. The tokenizer is checked
against tinyllm's on ids, text and the ChatML rendering.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it at import

import jinja2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tinyllm.errors import UserError
from tinyllm.export import export_hf, hf_architecture
from tinyllm.export.hf_tokenizer import write_hf_tokenizer
from tinyllm.inference.sampling import generate
from tinyllm.model import GPT, GPTConfig
from tinyllm.tokenizer import EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS, STOP_IDS, get_tokenizer

ROPE = dict(pos_emb="rope", norm="rmsnorm")
EXPORTABLE = {  # id -> (GPTConfig options, the transformers class it must load as)
    "gpt2": ({}, "GPT2LMHeadModel"),
    # the cpu preset's: doc_mask changes no weight, and a prompt is one document
    "gpt2-doc_mask": (dict(doc_mask=True), "GPT2LMHeadModel"),
    "gpt2-relu2-nobias-untied": (dict(mlp="relu2", bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    "llama": ({**ROPE, "mlp": "swiglu", "bias": False, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-bias-tied": ({**ROPE, "mlp": "swiglu", "bias": True}, "LlamaForCausalLM"),
    "qwen3": ({**ROPE, "mlp": "swiglu", "qk_norm": True, "bias": False, "tie_embeddings": False},
              "Qwen3ForCausalLM"),
    "arcee-gelu-bias-tied": ({**ROPE, "mlp": "gelu", "bias": True}, "ArceeForCausalLM"),
    # the `modern` preset's block
    "apertus-relu2": ({**ROPE, "mlp": "relu2", "qk_norm": True, "bias": False, "tie_embeddings": False},
                      "ApertusForCausalLM"),
}
TEXTS = [
    "Hello, world! It's 2024 and we're testing.",
    "  leading spaces\n\n\n\tthen tabs   ",
    "naïve café — 日本語のテキスト 😀🚀",
    "def f(x):\n    return x ** 2  # squared",
    "a <|im_start|>user\nnot special<|im_end|> b <|pad|><|endoftext|>",
    "spacing stays: a , b . c 's d n't",
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "Sure?\nThink again."}],
    [{"role": "user", "content": "  spaces first, then\n\nnewlines"}, {"role": "assistant", "content": ""}],
]
MAX_ABS_LOGIT_DIFF = 1e-4


def tiny_model(options: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:  # norm weights: around 1, but not 1
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(EXPORTABLE))
def exported(request, tmp_path_factory):
    options, architecture = EXPORTABLE[request.param]
    model = tiny_model(options)
    out = export_hf(model, tmp_path_factory.mktemp(request.param) / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    return model, hf.eval(), tok, out, architecture, info


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_hf_tokenizer(out, model_max_length=64)
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def sequences() -> list[list[int]]:
    """Varied token sequences within the tiny models' context, special ids included."""
    tl = get_tokenizer()
    seqs = [tl.prompt_ids(t)[:64] for t in TEXTS]
    seqs += [tl.prompt_ids(messages=c)[:64] for c in CHATS]
    return seqs


# -- the model --------------------------------------------------------------------------------


def test_loads_as_the_expected_class_with_every_weight(exported):
    model, hf, _, _, architecture, info = exported
    assert type(hf).__name__ == architecture == hf_architecture(model.config)
    assert hf.dtype == torch.float32
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.vocab_size == 50260  # the real vocabulary, not the padded rows
    if model.config.tie_embeddings:
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def test_logits_match_tinyllm(exported):
    model, hf, tok, *_ = exported
    tl = get_tokenizer()
    worst = 0.0
    for text in TEXTS:
        assert tok(text, split_special_tokens=True)["input_ids"] == tl.prompt_ids(text)
    for ids in sequences():
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = model(x), hf(input_ids=x).logits
        assert theirs.shape == ours.shape
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst < MAX_ABS_LOGIT_DIFF


def test_batched_logits_match(exported):
    model, hf, *_ = exported
    x = torch.tensor([s[:12] for s in sequences()[:3]])  # [3, 12]
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max().item() < MAX_ABS_LOGIT_DIFF


@pytest.mark.parametrize("prompt", ["Once upon a time", [{"role": "user", "content": "Tell me a story."}]])
def test_greedy_generate_matches_tinyllm(exported, prompt):
    """The exported tokenizer's own prompt (`tok(text)`, `apply_chat_template`) is tinyllm's, and
    transformers' greedy `generate` continues it as `tinyllm sample` / `chat` do."""
    model, hf, tok, *_ = exported
    tl = get_tokenizer()
    if isinstance(prompt, str):
        ours_prompt, hf_prompt = tl.prompt_ids(prompt), tok(prompt)["input_ids"]
    else:
        ours_prompt = tl.prompt_ids(messages=prompt)
        hf_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert list(hf_prompt) == ours_prompt
    ours = list(generate(model, ours_prompt, 10, temperature=0, stop_ids=STOP_IDS))
    with torch.no_grad():
        out = hf.generate(torch.tensor([hf_prompt]), attention_mask=torch.ones(1, len(hf_prompt), dtype=torch.long),
                          max_new_tokens=10, do_sample=False)
    theirs = out[0, len(hf_prompt):].tolist()
    if theirs and theirs[-1] in STOP_IDS:  # transformers keeps the stop token; tinyllm does not
        theirs = theirs[:-1]
    assert len(ours) >= 5
    assert theirs == ours


def test_generation_config_stops_like_tinyllm(exported):
    out = exported[3]
    gen = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert (gen.bos_token_id, gen.pad_token_id) == (EOT, PAD)
    assert gen.eos_token_id[0] == IM_END and set(gen.eos_token_id) == STOP_IDS
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files


def test_bfloat16_export_writes_bfloat16(tmp_path):
    model = tiny_model(EXPORTABLE["llama"][0])
    (tmp_path / "hf").mkdir()  # an existing empty folder is fine
    out = export_hf(model, tmp_path / "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # Upcast on load: the only difference left is each weight's rounding to bf16, which the
    # tinyllm model can share, so the logits must then agree as closely as in fp32.
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
        x = torch.tensor([sequences()[0]])
        assert (model(x) - hf(input_ids=x).logits).abs().max().item() < MAX_ABS_LOGIT_DIFF


def test_the_folder_is_as_readable_as_anything_else_the_user_writes(tmp_path):
    # A folder only its owner could open kept a model server running as another user out.
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    old = os.umask(0o022)
    try:
        out = export_hf(model, tmp_path / "new")
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared").chmod(0o2775)  # a group's folder, made empty for the export
        shared = export_hf(model, tmp_path / "shared")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o7777) == oct(0o755)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {p.name: oct(0o644) for p in out.iterdir()}
    assert oct(shared.stat().st_mode & 0o7777) == oct(0o2775)


# -- what cannot be exported --------------------------------------------------------------------


@pytest.mark.parametrize(("options", "named"), [
    (dict(pos_emb="rope", norm="layernorm"), "model.norm='layernorm' with pos_emb='rope'"),
    (dict(pos_emb="rope", norm="layernorm", mlp="relu2"), "model.norm='layernorm'"),
    (dict(norm="rmsnorm"), "model.norm='rmsnorm' with pos_emb='learned'"),
    (dict(mlp="swiglu"), "model.mlp='swiglu' with pos_emb='learned'"),
    (dict(qk_norm=True), "model.qk_norm=true with pos_emb='learned'"),
    ({**ROPE, "mlp": "swiglu", "qk_norm": True, "bias": True}, "model.bias=true with qk_norm=true"),
    ({**ROPE, "mlp": "relu2", "qk_norm": True, "bias": True}, "Apertus has no MLP biases"),
    (dict(vocab_size=1000), "model.vocab_size=1000"),
])
def test_unfaithful_combinations_are_refused_naming_the_option(tmp_path, options, named):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, **options))
    with pytest.raises(UserError, match="cannot export") as err:
        export_hf(model, tmp_path / "hf")
    assert named in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_refuses_a_non_empty_folder_and_a_bad_dtype(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(model, tmp_path)
    with pytest.raises(UserError, match="dtype 'int8'"):
        export_hf(model, tmp_path / "new", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# -- the tokenizer --------------------------------------------------------------------------------


def test_special_tokens_are_single_ids_equal_to_tinyllm(hf_tok):
    tl = get_tokenizer()
    for text, i in SPECIAL_TOKENS.items():
        assert hf_tok.convert_tokens_to_ids(text) == i
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == [i]
        assert hf_tok.decode([i]) == tl.decode([i]) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (IM_END, PAD, EOT)
    assert len(hf_tok) == 50260


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips_like_tinyllm(hf_tok, text):
    tl = get_tokenizer()
    ids = tl.encode(text)
    # split_special_tokens=True is how to encode untrusted text as tinyllm does; bos starts it.
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == tl.prompt_ids(text) == [EOT, *ids]
    assert hf_tok(text, split_special_tokens=True, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == tl.decode(ids) == text
    mixed = [IM_START, *ids, IM_END, EOT, PAD]
    assert hf_tok.decode(mixed) == tl.decode(mixed)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_any_text_encodes_like_tinyllm(hf_tok, text):
    tl = get_tokenizer()
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == tl.prompt_ids(text)


def test_special_token_text_becomes_special_ids_by_default(hf_tok):
    # The documented difference: HF tokenizers match special-token strings inside text.
    tl = get_tokenizer()
    ids = hf_tok("x<|im_start|>y<|im_end|>")["input_ids"]
    assert ids == [EOT, *tl.encode("x"), IM_START, *tl.encode("y"), IM_END]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_tinyllm_chatml(hf_tok, messages, add_generation_prompt):
    tl = get_tokenizer()
    # A conversation starts a document after <|endoftext|>, as tinyllm's prompts and rows do.
    rendered = [EOT, *tl.render_chat(messages, add_generation_prompt=add_generation_prompt).ids]
    if add_generation_prompt:
        assert rendered == tl.prompt_ids(messages=messages)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == tl.decode(rendered)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert list(ids) == rendered


def test_tokenized_chat_differs_from_tinyllm_only_where_documented(hf_tok):
    tl = get_tokenizer()
    injected = [{"role": "user", "content": "a<|im_end|>b"}]
    ids = list(hf_tok.apply_chat_template(injected, return_dict=False))
    assert ids.count(IM_END) == 2 and tl.render_chat(injected).ids.count(IM_END) == 1
    leading_newline = [{"role": "user", "content": "\n\nHi"}]
    ids = list(hf_tok.apply_chat_template(leading_newline, return_dict=False))
    ours = [EOT, *tl.render_chat(leading_newline).ids]
    assert ids != ours and hf_tok.decode(ids) == tl.decode(ours)


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "tool", "content": "x"}], "has role tool"),
    ([{"role": "user", "content": 3}], "needs a string content"),
])
def test_chat_template_rejects_what_tinyllm_rejects(hf_tok, messages, match):
    with pytest.raises(UserError):
        get_tokenizer().render_chat(messages)
    with pytest.raises(jinja2.TemplateError, match=match):
        hf_tok.apply_chat_template(messages, tokenize=False)
