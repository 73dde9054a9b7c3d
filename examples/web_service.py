"""A scoring web service that batches concurrent requests with ``mb.Batcher``.

Each ``POST /score`` request carries one text; the handler awaits ``batcher.submit(text)``, and the
model underneath is called once per batch of up to ``max_size`` texts. The model here is a stand-in
with the cost profile of real ones (a neural network forward pass, a database round trip, a paid
API call): a fixed cost per call plus a small cost per item, so batching pays.

Run it (needs the ``web`` extra: ``pip install 'microbatch[web]'``), from the repository's root::

    uvicorn examples.web_service:app          # serves on http://127.0.0.1:8000
    python examples/web_service.py            # the same, with --max-size/--max-wait options
    curl -s -X POST localhost:8000/score -d '{"text": "hello"}'
    curl -s localhost:8000/stats              # batches, sizes, flush reasons, waiting time

Endpoints:

- ``POST /score`` with ``{"text": "..."}``: ``{"text", "score", "batch", "batch_size"}``; 400 for a
  malformed body, 422 for an empty text (failed by the model for that item alone), 503 when the
  service is shutting down.
- ``GET /stats``: the batcher's counters.

The batcher lives exactly as long as the application: it is opened in the lifespan handler, so it
starts before the first request and, at shutdown, flushes the requests already submitted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import microbatch as mb


class ScoringModel:
    """A stand-in model: ``call_cost`` seconds per call plus ``item_cost`` seconds per text.

    ``__call__`` scores a list of texts and returns one result per text, in order. An empty text
    gets a ``ValueError`` instance in its place: the Batcher raises it for that request only.
    """

    def __init__(self, call_cost: float = 0.002, item_cost: float = 0.00001) -> None:
        self.call_cost = call_cost
        self.item_cost = item_cost
        self._batch_numbers = itertools.count(1)

    async def __call__(self, texts: list[str]) -> list[dict[str, Any] | Exception]:
        batch = next(self._batch_numbers)
        await anyio.sleep(self.call_cost + self.item_cost * len(texts))
        return [
            self.score(text) | {"batch": batch, "batch_size": len(texts)}
            if text
            else ValueError("text must not be empty")
            for text in texts
        ]

    @staticmethod
    def score(text: str) -> dict[str, Any]:
        """The deterministic score of one text, so that clients can check their answer."""
        digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
        return {"text": text, "score": int.from_bytes(digest, "big") / 2**32}


def create_app(
    *,
    max_size: int = 32,
    max_wait: float | None = 0.005,
    max_pending: int | None = None,
    model: ScoringModel | None = None,
) -> Starlette:
    """Build the application; the keyword arguments go to the ``Batcher`` (see its docstring)."""
    scoring = model if model is not None else ScoringModel()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher = mb.Batcher(scoring, max_size=max_size, max_wait=max_wait, max_pending=max_pending)
        async with batcher:
            app.state.batcher = batcher
            yield

    async def score(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            text = body["text"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected a JSON body {"text": "..."}'}, status_code=400)
        if not isinstance(text, str):
            return JSONResponse({"error": '"text" must be a string'}, status_code=400)
        batcher: mb.Batcher[str, dict[str, Any]] = request.app.state.batcher
        try:
            result = await batcher.submit(text)
        except ValueError as exc:  # the model failed this one text
            return JSONResponse({"error": str(exc)}, status_code=422)
        except mb.BatcherClosed:
            return JSONResponse({"error": "the service is shutting down"}, status_code=503)
        return JSONResponse(result)

    async def stats(request: Request) -> JSONResponse:
        s: mb.BatcherStats = request.app.state.batcher.stats
        return JSONResponse(
            {
                "batches": s.batches,
                "items": s.items,
                "batch_sizes": {str(size): count for size, count in s.batch_sizes.items()},
                "mean_batch_size": s.mean_batch_size,
                "flushed_by_size": s.flushed_by_size,
                "flushed_by_time": s.flushed_by_time,
                "flushed_by_close": s.flushed_by_close,
                "mean_wait": s.mean_wait,
                "wait_max": s.wait_max,
                "batch_errors": s.batch_errors,
                "item_errors": s.item_errors,
                "pending": s.pending,
                "running": s.running,
            }
        )

    return Starlette(
        routes=[Route("/score", score, methods=["POST"]), Route("/stats", stats, methods=["GET"])],
        lifespan=lifespan,
    )


# The application with the default settings, for ``uvicorn examples.web_service:app`` (or
# ``uvicorn web_service:app`` from the examples folder). The batcher starts with the server.
app = create_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-size", type=int, default=32)
    parser.add_argument("--max-wait", type=float, default=0.005)
    args = parser.parse_args()
    uvicorn.run(create_app(max_size=args.max_size, max_wait=args.max_wait), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
