"""The OpenAI endpoints' logic: a validated request becomes prompts, jobs, and a response.

Why it is shaped this way:
- Chat and text completions share everything after the prompt is built (limits, sampling, running,
  streaming, usage), so each endpoint only turns its request into token-id prompts and stop ids
  and hands over to `_respond`. A text or a conversation becomes ids through the tokenizer's
  `prompt_ids` and any special id ends a choice (`STOP_IDS`), exactly as in `tinyllm sample` and
  `tinyllm chat`, so the same prompt gets the same answer here and in the terminal.
- Every check that depends on the model (the model name, the context length, the vocabulary, how
  many choices one request may run) happens here, before any job is queued, so a refused request
  costs no generation and always gets its 4xx before a stream begins.
- Log-probabilities are a second pass: once a choice's tokens are known, a scoring job runs the
  prompt and those tokens through the model once (`tinyllm.inference.logprobs`), the same
  function `tinyllm eval --task` scores with. `echo` with `max_tokens: 0` is that pass alone,
  which is how lm-evaluation-harness asks for a continuation's log-likelihood. A text prompt's
  leading `<|endoftext|>` (added by `prompt_ids`) is context, not part of the echoed tokens.
- A non-streaming request also watches its connection: if the client leaves while it waits, its
  jobs are cancelled, just as a stream's are.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import tinyllm.serve.responses as R
from tinyllm.errors import UserError
from tinyllm.serve.choices import ChoiceRun, ChoiceSpec, GenerationFailed
from tinyllm.serve.errors import APIError
from tinyllm.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from tinyllm.serve.streams import replay_events, stream_events
from tinyllm.serve.worker import GenerationWorker, SamplingParams
from tinyllm.tokenizer import STOP_IDS, Tokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Every server also answers to this id, the one it served under before it took its run's name,
# so clients written against that keep working.
MODEL_ALIAS = "tinyllm"
AnyRequest = ChatCompletionRequest | CompletionRequest
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIEndpoints:
    """Serves one model under one name."""

    def __init__(
        self,
        worker: GenerationWorker,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        context_length: int,
        vocab_size: int,
        max_choices: int = 16,
    ) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = context_length
        self.vocab_size = vocab_size
        # More jobs than the worker can hold even when idle would get a 429 ("retry later") forever.
        self.max_choices = min(max_choices, worker.max_active + worker.max_queued)
        self._card = R.ResponseMeta(R.TEXT, model_name)  # its `created` dates the model card

    def model_card(self) -> dict:
        # max_model_len is vLLM's extension; the chat page reads it to bound max_tokens.
        return {
            "id": self.model_name,
            "object": "model",
            "created": self._card.created,
            "owned_by": "tinyllm",
            "max_model_len": self.context_length,
        }

    async def chat_completions(self, request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        self.check_request(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(
                400,
                "invalid 'top_logprobs': it needs 'logprobs': true",
                param="top_logprobs",
                code="invalid_value",
            )
        try:
            ids = self.tokenizer.prompt_ids(messages=[m.as_chatml() for m in req.messages])
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self._respond(request, req, R.CHAT, [ids], STOP_IDS, None, top)

    async def completions(self, request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        self.check_request(req)
        if req.suffix:
            raise APIError(
                400, "suffix (insertion) is not supported by this server", param="suffix"
            )
        prompts, added = self._text_prompts(req.prompt, req.n or 1)
        echo = [self.tokenizer.decode_text(p) for p in prompts] if req.echo else None
        return await self._respond(
            request, req, R.TEXT, prompts, STOP_IDS, echo, req.logprobs, added
        )

    # -- checks ---------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        """Raise a 404 unless `name` is the served model's name (or `MODEL_ALIAS`)."""
        if name not in (self.model_name, MODEL_ALIAS):
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.model_name}' "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def check_request(self, req: AnyRequest) -> None:
        """The model, and the options both endpoints share that the schema cannot check alone."""
        self.check_model(req.model)
        fmt = req.response_format
        if fmt is not None and fmt.type != "text":
            raise APIError(
                400,
                f"response_format {fmt.type!r} is not supported by this server: it generates free "
                'text only, so send {"type": "text"} or leave response_format out',
                param="response_format",
            )
        bad = [t for t in req.token_bias if t >= self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"invalid 'logit_bias': token id {bad[0]} is outside the vocabulary "
                f"[0, {self.vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )

    def _text_prompts(self, prompt: str | list, n: int) -> tuple[list[list[int]], list[int]]:
        """The prompts' ids, and per prompt how many leading ids the server added (not echoed)."""
        items = prompt if isinstance(prompt, list) and not isinstance(prompt[0], int) else [prompt]
        # Before tokenizing, on the event loop: 200,000 one-letter prompts (a 1 MiB body) held
        # every stream for over a second, only to be refused here.
        self._check_choices(n, len(items))
        prompts, added = [], []
        for item in items:
            # A text gets prompt_ids' leading <|endoftext|>; token ids are the client's own and
            # go in as given (lm-evaluation-harness counts its context in them).
            added.append(1 if isinstance(item, str) else 0)
            if isinstance(item, str):
                prompts.append(self.tokenizer.prompt_ids(item))
                continue
            bad = [t for t in item if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"invalid 'prompt': token id {bad[0]} is outside the vocabulary "
                    f"[0, {self.vocab_size})",
                    param="prompt",
                    code="invalid_value",
                )
            prompts.append(list(item))
        return prompts, added

    def _max_tokens(
        self, limit: int | None, prompt_len: int, default: int | None, prompt_param: str
    ) -> int:
        """The completion budget: the client's limit, else the default, else the rest of the context."""
        room = self.context_length - prompt_len
        wanted = limit if limit is not None else default
        if wanted is None and room >= 1:
            return room
        # max_tokens 0 (scoring only) may fill the context
        if wanted is not None and wanted <= room:
            return wanted
        if room < 1:
            problem, param = f"the prompt alone is {prompt_len} tokens", prompt_param
        else:
            problem, param = (
                f"{prompt_len} prompt tokens + max_tokens {wanted} = {prompt_len + wanted}",
                "max_tokens",
            )
        raise APIError(
            400,
            f"This model's maximum context length is {self.context_length} tokens, but {problem}. "
            "Shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )

    def _check_choices(self, n: int, n_prompts: int) -> None:
        if n * n_prompts > self.max_choices:
            raise APIError(
                400,
                f"this request asks for {n * n_prompts} choices (n x prompts); "
                f"this server allows at most {self.max_choices}",
                param="n",
                code="invalid_value",
            )

    def _specs(
        self, req: AnyRequest, kind: str, prompts: list[list[int]], stop_ids: frozenset[int]
    ) -> list[ChoiceSpec]:
        n = req.n or 1
        self._check_choices(n, len(prompts))
        default_max = None if kind == R.CHAT else COMPLETIONS_DEFAULT_MAX_TOKENS
        prompt_param = "messages" if kind == R.CHAT else "prompt"
        specs = []
        for prompt in prompts:
            max_new = self._max_tokens(req.token_limit, len(prompt), default_max, prompt_param)
            for j in range(n):
                params = SamplingParams(
                    max_new_tokens=max_new,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_k=req.top_k,
                    top_p=req.top_p if req.top_p is not None and req.top_p < 1 else None,
                    # Each of the n choices gets its own seed, so they differ but still reproduce.
                    seed=None if req.seed is None else (req.seed + j) % 2**64,
                    stop_ids=stop_ids,
                    logit_bias=req.token_bias,
                )
                specs.append(ChoiceSpec(prompt, params, req.stop_strings))
        return specs

    # -- running --------------------------------------------------------------------------------
    async def _respond(
        self,
        request: Request,
        req: AnyRequest,
        kind: str,
        prompts: list[list[int]],
        stop_ids: frozenset[int],
        echo: list[str] | None,
        logprobs: int | None = None,
        added: list[int] | None = None,
    ) -> Response:
        """Run the choices; `logprobs` (alternatives per token) also scores them.

        `added`: per prompt, how many leading ids the server put there (not echoed).
        """
        specs = self._specs(req, kind, prompts, stop_ids)
        meta = R.ResponseMeta(kind, self.model_name)
        prompt_tokens = sum(len(p) for p in prompts)
        n = req.n or 1
        run = ChoiceRun(self.worker, self.tokenizer, specs)
        run.start()
        if req.stream and logprobs is None:
            events = stream_events(
                run,
                meta,
                len(specs),
                prompt_tokens,
                req.include_usage,
                [echo[i // n] for i in range(len(specs))] if echo else None,
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        results = await _collect_unless_disconnected(request, run)
        if results is None:  # nobody is listening; 499 is only for the access log
            return Response(status_code=499)
        lps = None
        if logprobs is not None:
            lps = await self._logprobs(
                request,
                kind,
                specs,
                run.token_ids,
                results,
                logprobs,
                echo,
                added or [0] * len(prompts),
            )
            if lps is None:
                return Response(status_code=499)
        if echo:
            results = [(echo[i // n] + text, reason) for i, (text, reason) in enumerate(results)]
        usage = R.usage(prompt_tokens, sum(run.completion_tokens))
        if req.stream:  # with logprobs: a choice is scored once whole, so it comes as one chunk
            events = replay_events(meta, results, lps, usage if req.include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(R.completion_body(meta, results, usage, lps))

    async def _logprobs(
        self,
        request: Request,
        kind: str,
        specs: list[ChoiceSpec],
        generated: list[list[int]],
        results: list[tuple[str, str]],
        top: int,
        echo: list[str] | None,
        added: list[int],
    ) -> list[dict] | None:
        """Each choice's logprobs object, from one scoring job per choice (None: client left)."""
        scoring = [
            ChoiceSpec(s.prompt_ids + ids, s.params, score=top)
            for s, ids in zip(specs, generated, strict=True)
        ]
        run = ChoiceRun(self.worker, self.tokenizer, scoring)
        run.start()
        if await _collect_unless_disconnected(request, run) is None:
            return None
        out, n = [], len(specs) // len(added)
        for i, (spec, scores, (text, _)) in enumerate(zip(specs, run.scores, results, strict=True)):
            assert scores is not None  # every scoring job reports before it ends
            prompt_len, begin = len(spec.prompt_ids), added[i // n]
            offsets = R.text_offsets(self.tokenizer, list(scores.ids[begin:]))
            shown = len(self.tokenizer.decode_text(spec.prompt_ids)) + len(text)
            # Tokens past a stop string that cut the text are not part of the answer.
            stop = begin + sum(
                1 for t, o in enumerate(offsets) if t + begin < prompt_len or o < shown
            )
            if kind == R.CHAT:
                out.append(R.chat_logprobs(self.tokenizer, scores, prompt_len, stop))
            else:
                start = begin if echo else prompt_len
                out.append(
                    R.completion_logprobs(
                        self.tokenizer, scores, start, stop, offsets[start - begin : stop - begin]
                    )
                )
        return out


async def _collect_unless_disconnected(
    request: Request, run: ChoiceRun
) -> list[tuple[str, str]] | None:
    """All choices' (text, finish_reason), or None if the client disconnected first."""
    collecting = asyncio.ensure_future(run.collect())
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not collecting.done():
            collecting.cancel()
        run.cancel()
    if not collecting.done() or collecting.cancelled():
        return None
    try:
        return collecting.result()
    except GenerationFailed as e:
        raise APIError(e.status, str(e), code=e.code) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
