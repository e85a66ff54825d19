"""HTTP serving: the OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) and a
chat page, over one model owned by a generation worker thread.

Layering, from the socket inwards: `server` (uvicorn) -> `app` (routes, page, lifespan) ->
`endpoints` (request -> prompts -> response) with `schemas` (validation), `responses` (JSON
shapes), `streams` (server-sent event bodies) and `errors` (OpenAI error bodies, body limit) ->
`choices` (one request's jobs read back as text, via `tinyllm.inference.textstream`) -> `worker`
(the thread that owns the model and sees only token ids). Beside the API, `runinfo` reads what the
page shows about the served run (GET /run) and `tokenizer_routes` serves vLLM's tokenizer
endpoints for eval harnesses. `tinyllm.bench.serve` measures the whole stack from the client side.
This package only re-exports `create_app`, `serve` and `BackgroundServer`; its own modules never
import from it (`from tinyllm.serve import ...`), which would go in a circle through `app`.
"""

from tinyllm.serve.app import create_app
from tinyllm.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "create_app", "serve"]
