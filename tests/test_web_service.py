"""The example web service, served for real by uvicorn on 127.0.0.1 and called through httpx.

The server runs in its own thread (with its own asyncio loop, as in production); the client side
runs on every backend.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import uvicorn

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "web_service.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("web_service_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


web_service = load_example()


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", backlog=512))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:  # readiness poll: nothing below depends on how long it takes
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not shut down within 30 s"


async def post_all(base_url: str, texts: list[str]) -> dict[str, httpx.Response]:
    """POST every text concurrently, one connection each; return the responses by text."""
    responses: dict[str, httpx.Response] = {}
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:

        async def post(text: str) -> None:
            responses[text] = await client.post("/score", json={"text": text})

        async with anyio.create_task_group() as tg:
            for text in texts:
                tg.start_soon(post, text)
    return responses


async def test_200_concurrent_requests_each_get_their_own_result_in_full_batches() -> None:
    # max_wait=None: a batch is dispatched only when it holds max_size requests, so the sizes
    # are exact however fast the requests arrive.
    app = web_service.create_app(max_size=8, max_wait=None)
    texts = [f"request number {i}" for i in range(200)]
    async with serve(app) as base_url:
        responses = await post_all(base_url, texts)
        async with httpx.AsyncClient(base_url=base_url) as client:
            stats = (await client.get("/stats")).json()

    assert sorted(responses) == sorted(texts)
    batches: dict[int, int] = {}
    for text, response in responses.items():
        assert response.status_code == 200, response.text
        body = response.json()
        expected = web_service.ScoringModel.score(text)
        assert (body["text"], body["score"]) == (expected["text"], expected["score"])
        batches.setdefault(body["batch"], body["batch_size"])
        assert batches[body["batch"]] == body["batch_size"]
    members = Counter(response.json()["batch"] for response in responses.values())
    assert members == dict.fromkeys(range(1, 26), 8)  # 25 batches of exactly 8 requests
    assert stats["batches"] == 25 and stats["items"] == 200
    assert stats["batch_sizes"] == {"8": 25}
    assert stats["flushed_by_size"] == 25


async def test_time_bounded_batches_stay_within_max_size() -> None:
    app = web_service.create_app(max_size=16, max_wait=0.005)
    texts = [f"text {i}" for i in range(200)]
    async with serve(app) as base_url:
        responses = await post_all(base_url, texts)
    sizes: Counter[int] = Counter()
    for text, response in responses.items():
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["score"] == web_service.ScoringModel.score(text)["score"]
        assert 1 <= body["batch_size"] <= 16
        sizes[body["batch"]] += 1
    # each batch's reported size equals the number of responses that carried it
    for response in responses.values():
        body = response.json()
        assert sizes[body["batch"]] == body["batch_size"]
    assert sum(sizes.values()) == 200


async def test_bad_requests_fail_alone() -> None:
    app = web_service.create_app(max_size=4, max_wait=0.001)
    async with serve(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with anyio.create_task_group() as tg:
                results: dict[str, httpx.Response] = {}

                async def post(key: str, body: Any) -> None:
                    results[key] = await client.post("/score", json=body)

                tg.start_soon(post, "empty", {"text": ""})
                tg.start_soon(post, "good", {"text": "fine"})
                tg.start_soon(post, "malformed", {"txt": "oops"})
            stats = (await client.get("/stats")).json()
    assert results["empty"].status_code == 422
    assert results["empty"].json() == {"error": "text must not be empty"}
    assert results["good"].status_code == 200
    assert results["good"].json()["text"] == "fine"
    assert results["malformed"].status_code == 400
    assert stats["item_errors"] == 1 and stats["batch_errors"] == 0


def test_the_documented_uvicorn_command_serves_the_module_level_app() -> None:
    """``uvicorn examples.web_service:app``, run from the repository's root, as the docs say (on a
    socket of 127.0.0.1 the test made, handed over with ``--fd``), answers requests."""
    import os
    import signal
    import subprocess

    root = EXAMPLE.parent.parent
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.web_service:app", "--fd", str(sock.fileno())],
            cwd=root,
            env=env,
            pass_fds=[sock.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:  # readiness poll: the socket accepts before the app has started
                try:
                    response = client.post("/score", json={"text": "hello"})
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                    assert time.monotonic() < deadline, "uvicorn did not answer within 30 s"
                    time.sleep(0.05)
            assert response.status_code == 200, response.text
            assert response.json()["score"] == web_service.ScoringModel.score("hello")["score"]
            assert client.get("/stats").json()["items"] == 1
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # uvicorn shuts the app down, then exits by the signal it caught (recent versions) or with 0.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert b"Application shutdown complete" in output, output
