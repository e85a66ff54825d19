"""HTTP serving: the OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) and a
chat page, over one model owned by a generation worker thread.

Layering, from the socket inwards: `server` (uvicorn) -> `app` (routes, page, lifespan) ->
`endpoints` (request -> prompts -> response) with `schemas` (validation), `responses` (JSON
shapes) and `errors` (OpenAI error bodies, body limit) -> `choices` (one request's jobs read back
as text, via `tinyllm.inference.textstream`) -> `worker` (the thread that owns the model and sees
only token ids). `runinfo` reads what the page shows about the served run (GET /run).
`tinyllm.bench.serve` measures the whole stack from the client side.
"""

from tinyllm.serve.app import create_app
from tinyllm.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "create_app", "serve"]
