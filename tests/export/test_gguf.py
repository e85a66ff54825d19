"""A GGUF export runs in llama.cpp itself (llama-cpp-python) and computes what tinyllm computes.

One tiny run is trained per llama.cpp architecture the export targets (2 layers x 32 wide, the
real 50,260-token vocabulary, context 64, 20 steps of 256 tokens on the builtin stories),
covering biases on and off and tied and untied heads. llama.cpp then has to tokenize as tinyllm
does, give the same greedy continuation and chat reply, logits within the tolerances below, and
a q8_0 perplexity within 2% of f32's.
"""

from __future__ import annotations

import itertools
import math

import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import Llama

from tinyllm.cli import main
from tinyllm.config import resolve
from tinyllm.data.dataset import trained_dataset
from tinyllm.data.loader import TokenLoader
from tinyllm.errors import UserError
from tinyllm.export.gguf import export_gguf, gguf_architecture
from tinyllm.inference.sampling import generate
from tinyllm.model import GPT, GPTConfig
from tinyllm.runtime.checkpoint import load_model
from tinyllm.tokenizer import EOT, IM_END, IM_START, PAD, STOP_IDS, get_tokenizer

ROPE = ["model.pos_emb=rope", "model.norm=rmsnorm"]
ARCHS = {  # llama.cpp architecture -> the run's --set options
    "gpt2": [],  # the default block: learned positions, LayerNorm, GELU, biases, tied head
    "starcoder2": ["model.pos_emb=rope"],  # GPT-2's block with RoPE: LayerNorm, GELU, biases
    "llama": [*ROPE, "model.mlp=swiglu"],  # biases (permuted with q and k), tied head
    "qwen3": [*ROPE, "model.mlp=swiglu", "model.qk_norm=true", "model.bias=false",
              "model.tie_embeddings=false"],
    "arcee": [*ROPE, "model.mlp=relu2", "model.bias=false"],
    "apertus": [*ROPE, "model.mlp=relu2", "model.qk_norm=true", "model.bias=false",
                "model.tie_embeddings=false"],  # the `modern` preset's block
}
CONTEXT = 64
TEXTS = [
    "Hello, world! It's 2024 and we're testing.",
    "  leading spaces\n\n\n\tthen tabs   ",
    "a  b   c\n \n  d\r\n\te \u00a0f",
    "naïve café — 日本語のテキスト 😀🚀",
    "def f(x):\n    return x ** 2  # squared",
    "a <|im_start|>user\nnot special<|im_end|> b <|pad|><|endoftext|>",
    "spacing stays: a , b . c 's d n't 123 4567",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where did Tom go?"}]
# Largest |logit| difference from tinyllm's fp32 model measured on an AMX Xeon (llama-cpp-python
# 0.3.36): f32 files with an f32 KV cache: gpt2 2.5e-5, llama 1.2e-6, qwen3 9.5e-7, arcee 4.2e-6,
# apertus 9.5e-7; f16 files (default f16 cache) 5.8e-4 .. 1.1e-2 (arcee). ggml's CPU GELU reads a float16 table, so gpt2 and starcoder2 get the f16 bound. The
# bounds leave room for other CPUs' kernels.
F32_CACHE = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
MAX_LOGIT_DIFF = {("gpt2", "f32"): 2e-2, ("starcoder2", "f32"): 2e-2, "f32": 5e-3, "f16": 2e-2}


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, builtin_cache, tmp_path_factory):
    """(arch, tinyllm model, its val data, {dtype: Llama}, run dir) for a freshly trained tiny run."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"run-{arch}")
    settings = ["data.builtin_tokens=40000", f"model.block_size={CONTEXT}",
                "train.micro_batch=4", "train.grad_accum=1", "train.eval_every=20", "train.eval_batches=1",
                "train.checkpoint_every=20", "train.log_every=10", *ARCHS[arch]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_CACHE", str(builtin_cache))
        args = ["train", "--preset", "tiny", "--out", str(out), "--max-steps", "20", "--sample-every", "0"]
        assert main([*args, *itertools.chain.from_iterable(("--set", s) for s in settings)]) == 0
        model, cfg, _ = load_model(out)
        data = trained_dataset(cfg.data)
    files = {d: export_gguf(model, out / f"model-{d}.gguf", dtype=d) for d in ("f32", "f16", "q8_0")}
    # f32 files run with an f32 KV cache: llama.cpp's default f16 cache rounds keys and values,
    # which a ReLU^2 model's large activations turn into logit errors of ~1e-2 (arcee, 8.2e-3).
    llamas = {d: load_llama(f, **(F32_CACHE if d == "f32" else {})) for d, f in files.items()}
    yield arch, model, data, llamas, out
    for llm in llamas.values():
        llm.close()


def load_llama(path, **kwargs) -> Llama:
    """llama.cpp on `path` with tinyllm's context, without llama.cpp's extra CPU buffer types.

    On this AMX Xeon llama.cpp 0.3.36 repacks q8_0 matrices for its AMX kernels and then
    segfaults in decode (32- to 128-wide models; f32 and f16 are not repacked). Plain CPU
    buffers compute the same function, which is what these tests check.
    """
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
        kwargs = {"n_ctx": CONTEXT, "logits_all": True, **kwargs}
        return Llama(model_path=str(path), verbose=False, **kwargs)


def llama_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence, from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def sequences() -> list[list[int]]:
    tl = get_tokenizer()
    return [tl.prompt_ids(t)[:CONTEXT] for t in TEXTS] + [tl.prompt_ids(messages=CHAT)]


# -- the model --------------------------------------------------------------------------------


def test_runs_as_the_expected_architecture(exported):
    arch, model, _, llamas, _ = exported
    assert gguf_architecture(model.config) == arch
    for llm in llamas.values():
        assert llm.metadata["general.architecture"] == arch
        assert llm.n_vocab() == model.config.vocab_size == 50260
        assert llm.metadata[f"{arch}.context_length"] == str(CONTEXT)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_logits_match_tinyllm(exported, dtype):
    arch, model, _, llamas, _ = exported
    worst = 0.0
    for ids in sequences():
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        theirs = llama_logits(llamas[dtype], ids)
        assert theirs.shape == ours.shape
        worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"{arch} {dtype}: max |logit diff| {worst:.2e}")
    assert worst < MAX_LOGIT_DIFF.get((arch, dtype), MAX_LOGIT_DIFF[dtype])


def test_greedy_continuation_matches_tinyllm_for_32_tokens(exported):
    _, model, _, llamas, _ = exported
    llm = llamas["f32"]
    prompt = get_tokenizer().prompt_ids("Once upon a time, Tom")
    ours = list(generate(model, prompt, 32, temperature=0))  # no stop ids: all 32 tokens
    llm.reset()
    theirs = list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0), 32))
    assert len(ours) == 32
    assert theirs == ours


def test_chat_mode_renders_chatml_and_answers_like_tinyllm(exported):
    """llama.cpp's chat completion formats the conversation with the file's template into
    tinyllm's prompt ids, and its greedy reply is tinyllm's up to the stop token."""
    _, model, _, llamas, _ = exported
    tl = get_tokenizer()
    prompt = tl.prompt_ids(messages=CHAT)
    reply = list(generate(model, prompt, 24, temperature=0, stop_ids=STOP_IDS))
    llamas["f32"].reset()
    r = llamas["f32"].create_chat_completion(messages=CHAT, max_tokens=24, temperature=0.0, top_k=1)
    assert r["usage"]["prompt_tokens"] == len(prompt)
    assert r["choices"][0]["message"]["content"] == tl.decode_text(reply)


def test_q8_0_perplexity_within_2_percent_of_f32(exported):
    _, model, data, llamas, _ = exported
    loader = TokenLoader(data, "val", batch_size=4, context=CONTEXT)
    nll = {"tinyllm": 0.0, "f32": 0.0, "q8_0": 0.0}
    n = 0
    for _, batch in loader.eval_pass(max_rows=6):  # 6 x 64 tokens
        for x, y in zip(batch.inputs.tolist(), batch.targets, strict=True):
            keep = y >= 0
            for name in nll:
                if name == "tinyllm":
                    with torch.no_grad():
                        logits = model(torch.tensor([x]))[0]
                else:
                    logits = torch.from_numpy(llama_logits(llamas[name], x))
                nll[name] += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            n += int(keep.sum())
    ppl = {k: math.exp(v / n) for k, v in nll.items()}
    print(f"perplexity over {n} val tokens: {ppl}")
    assert n >= 300
    assert abs(ppl["f32"] / ppl["tinyllm"] - 1) < 1e-3
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02


# -- the tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_tok(tmp_path_factory):
    """llama.cpp's tokenizer from an export (the same in every file, whatever the model)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT))
    path = export_gguf(model, tmp_path_factory.mktemp("tok") / "m.gguf", dtype="q8_0")
    llm = load_llama(path, vocab_only=True)
    yield llm
    llm.close()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizes_text_like_tinyllm(llm_tok, text):
    tl = get_tokenizer()
    # special=False is llama.cpp's plain-text mode: special-token strings stay text, as in tinyllm.
    assert llm_tok.tokenize(text.encode(), add_bos=True, special=False) == tl.prompt_ids(text)
    assert llm_tok.tokenize(text.encode(), add_bos=False, special=False) == tl.encode(text)
    assert llm_tok.detokenize(tl.encode(text)) == text.encode()


def test_special_tokens_have_tinyllms_ids(llm_tok):
    assert (llm_tok.token_bos(), llm_tok.token_eos()) == (EOT, IM_END)
    # The ids llama.cpp ends a generation at: all of tinyllm's stop ids but <|pad|> (never a target).
    vocab = llm_tok._model.vocab
    assert {i for i in STOP_IDS if llama_cpp.llama_vocab_is_eog(vocab, i)} == {EOT, IM_START, IM_END}
    assert llm_tok.metadata["tokenizer.ggml.padding_token_id"] == str(PAD)
    ids = llm_tok.tokenize(b"<|im_start|>user\nhi<|im_end|><|pad|>", add_bos=False, special=True)
    assert ids == [IM_START, *get_tokenizer().encode("user\nhi"), IM_END, PAD]


# -- the command ------------------------------------------------------------------------------


def test_export_command_writes_the_runs_gguf(exported, tmp_path, capsys):
    arch, model, _, llamas, run_dir = exported
    out = tmp_path / "cli.gguf"
    assert main(["export", "--run", str(run_dir), "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: {arch}, q8_0" in said and "llama-server" in said
    llm = load_llama(out)
    assert llm.metadata["general.name"] == run_dir.name
    ids = get_tokenizer().prompt_ids("Once upon a time")
    assert np.array_equal(llama_logits(llm, ids), llama_logits(llamas["q8_0"], ids))  # same bytes, same logits
    llm.close()


def test_a_run_given_as_dot_names_the_model_after_the_run(exported, tmp_path, monkeypatch):
    # `cd RUN && tinyllm export --run . ...` wrote no general.name: the name of "." is "".
    _, _, _, _, run_dir = exported
    monkeypatch.chdir(run_dir)
    out = tmp_path / "dot.gguf"
    assert main(["export", "--run", ".", "--format", "gguf", "--out", str(out)]) == 0
    llm = load_llama(out)
    assert llm.metadata.get("general.name") == run_dir.name
    llm.close()


@pytest.mark.parametrize(("flags", "error"), [
    (["--dtype", "bf16"], "--dtype bf16 is not a --format gguf precision: use one of f32, f16, q8_0"),
    (["--dtype", "q8_0", "--format", "hf"], "--dtype q8_0 is not a --format hf precision"),
])
def test_export_command_mistakes_are_one_line(tmp_path, capsys, flags, error):
    args = ["export", "--run", str(tmp_path), "--out", str(tmp_path / "m.gguf")]
    if "--format" not in flags:
        args += ["--format", "gguf"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert error in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- what cannot be exported ------------------------------------------------------------------


@pytest.mark.parametrize(("options", "named"), [
    (dict(mlp="relu2"), "model.mlp='relu2' with pos_emb='learned'"),
    (dict(norm="rmsnorm"), "model.norm='rmsnorm' with pos_emb='learned'"),
    (dict(qk_norm=True), "model.qk_norm=true with pos_emb='learned'"),
    (dict(pos_emb="rope", norm="layernorm", mlp="swiglu"), "model.norm='layernorm', mlp='swiglu' with pos_emb='rope'"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="gelu"), "model.norm='rmsnorm', mlp='gelu' with pos_emb='rope'"),
    (dict(pos_emb="rope", qk_norm=True), "model.norm='layernorm', mlp='gelu', qk_norm=true with pos_emb='rope'"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", bias=True), "model.bias=true with norm='rmsnorm', mlp='relu2'"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True), "qwen3 loads no MLP or attention-output biases"),
    (dict(vocab_size=1000), "model.vocab_size=1000"),
])
def test_unfaithful_combinations_are_refused_naming_the_option(tmp_path, options, named):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, **options))
    with pytest.raises(UserError, match="cannot export this model to GGUF") as err:
        export_gguf(model, tmp_path / "m.gguf")
    assert named in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("preset", ["cpu", "seed", "tiny", "modern"])
def test_every_shipped_preset_exports(preset):
    # A default recipe whose runs llama.cpp cannot load would close that door to most users
    # (RoPE with a plain GELU MLP learns more on the stories, and has no llama.cpp architecture).
    assert gguf_architecture(resolve(preset).model) == ("apertus" if preset == "modern" else "gpt2")


@pytest.mark.parametrize("options", [dict(bias=False), dict(bias=False, tie_embeddings=False)])
def test_a_bias_free_starcoder2_block_gets_the_zero_biases_llama_cpp_requires(tmp_path, options):
    # llama.cpp's starcoder2 refuses a file without every norm and Linear bias.
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, pos_emb="rope", **options))
    with torch.no_grad():  # away from init, where every bias is zero anyway
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    llm = load_llama(export_gguf(model, tmp_path / "m.gguf"), **F32_CACHE)
    assert llm.metadata["general.architecture"] == "starcoder2"
    ids = get_tokenizer().prompt_ids("Once upon a time, Tom")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(ours - llama_logits(llm, ids)).max() < MAX_LOGIT_DIFF[("starcoder2", "f32")]
    llm.close()


def test_refuses_an_existing_file_and_a_bad_dtype(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(UserError, match="dtype 'bf16'"):
        export_gguf(model, tmp_path / "new.gguf", dtype="bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_a_file_made_at_out_while_exporting_is_left_as_it_is(tmp_path, monkeypatch):
    # The check came before the export and a rename after it: a file made in between was replaced.
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    out = tmp_path / "m.gguf"
    gguf = pytest.importorskip("gguf")
    write_tensors = gguf.GGUFWriter.write_tensors_to_file

    def meanwhile(self, *args, **kwargs):
        out.write_text("mine")  # another export, or the user, at the same moment
        return write_tensors(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", meanwhile)
    with pytest.raises(UserError, match="was made while the export ran"):
        export_gguf(model, out)
    assert out.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_missing_folders_above_the_file_are_made_as_for_hf(tmp_path):
    # The error used to name a temporary file in a folder that did not exist.
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    out = export_gguf(model, tmp_path / "models" / "tiny" / "m.gguf")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
