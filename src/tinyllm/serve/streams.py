"""The server-sent event bodies of streamed completions: live, or replayed once scored.

Why it is shaped this way: a stream normally forwards each choice's text as the worker makes it
(`stream_events`). Log-probabilities come from scoring a choice once it is whole (see
`endpoints`), so a streamed request that asks for them gets the same chunks in the same shape,
each choice's text and logprobs in one chunk, once scored (`replay_events`); OpenAI's chunk
shape allows any number of tokens per chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import tinyllm.serve.responses as R
from tinyllm.serve.choices import ChoiceRun, GenerationFailed
from tinyllm.serve.errors import error_body


async def stream_events(
    run: ChoiceRun,
    meta: R.ResponseMeta,
    n_choices: int,
    prompt_tokens: int,
    include_usage: bool,
    echo: list[str] | None,
) -> AsyncIterator[str]:
    """The SSE body: a first chunk per choice, text deltas, finishes, optional usage, [DONE]."""
    try:
        for i in range(n_choices):
            if meta.kind == R.CHAT:
                yield R.sse(R.chunk(meta, i, role=True, text="", with_usage_field=include_usage))
            elif echo:
                yield R.sse(R.chunk(meta, i, text=echo[i], with_usage_field=include_usage))
        async for d in run.deltas():
            if d.text:
                yield R.sse(R.chunk(meta, d.index, text=d.text, with_usage_field=include_usage))
            if d.finish_reason:
                yield R.sse(
                    R.chunk(
                        meta, d.index, finish_reason=d.finish_reason, with_usage_field=include_usage
                    )
                )
        if include_usage:
            yield R.sse(R.usage_chunk(meta, R.usage(prompt_tokens, sum(run.completion_tokens))))
    except GenerationFailed as e:
        yield R.sse(error_body(e.status, str(e), code=e.code))
    finally:
        run.cancel()  # also reached when the client disconnects and the stream is cancelled
    yield R.SSE_DONE


async def replay_events(
    meta: R.ResponseMeta,
    results: list[tuple[str, str]],
    logprobs: list[dict] | None,
    usage: dict | None,
) -> AsyncIterator[str]:
    """Finished choices as a stream: per choice its text (and logprobs), then its finish."""
    with_usage = usage is not None
    for i, (text, reason) in enumerate(results):
        lp = logprobs[i] if logprobs else None
        if meta.kind == R.CHAT:
            yield R.sse(R.chunk(meta, i, role=True, text="", with_usage_field=with_usage))
        yield R.sse(R.chunk(meta, i, text=text, logprobs=lp, with_usage_field=with_usage))
        yield R.sse(R.chunk(meta, i, finish_reason=reason, with_usage_field=with_usage))
    if usage is not None:
        yield R.sse(R.usage_chunk(meta, usage))
    yield R.SSE_DONE
