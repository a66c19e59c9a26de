"""Local teachers for the teacher tests, both real HTTP servers on 127.0.0.1: fedlm's own ``fedlm serve`` app over a
finished tiny run, and a small FastAPI stub answering from a fixed table, with routes that fail in set ways."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

#: The stub's answers by the last user message; anything else gets DEFAULT_ANSWER.
TABLE = {"What is a cat?": "A small animal.", "Name a colour.": "Blue."}
DEFAULT_ANSWER = "I do not know."
ALTERNATIVES = ("x", "q")  # the other top-k candidates of every token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port; yields ``http://127.0.0.1:PORT``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the teacher test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def answer_body(text: str, logprobs: bool) -> dict[str, Any]:
    """A chat completion in OpenAI's shape; with ``logprobs`` one token per character and two alternatives each."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs:
        content = []
        for char in text:
            top = [{"token": char, "logprob": -0.1}] + [{"token": alt, "logprob": -3.0} for alt in ALTERNATIVES if alt != char]
            content.append({"token": char, "logprob": -0.1, "top_logprobs": top})
        choice["logprobs"] = {"content": content}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub", "choices": [choice]}


class Stub:
    """The stub teacher: ``/{route}/v1/chat/completions`` with routes ``ok`` (table, logprobs when asked), ``plain``
    (no logprobs), ``flaky`` (HTTP 503 for the first ``flaky_failures`` requests, then ``ok``), ``down`` (always
    HTTP 500), ``bad`` (no ``choices``), ``slow`` (sleeps ``slow_s``). ``calls`` counts requests per route."""

    def __init__(self, flaky_failures: int = 2, slow_s: float = 2.0) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.flaky_failures = flaky_failures
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/{route}/v1/chat/completions")(self.chat)

    async def chat(self, route: str, request: Request) -> JSONResponse:
        body = await request.json()
        with self.lock:
            self.calls[route] += 1
            n = self.calls[route]
        text = TABLE.get(body["messages"][-1]["content"], DEFAULT_ANSWER)
        if route == "down" or (route == "flaky" and n <= self.flaky_failures):
            status = 500 if route == "down" else 503
            return JSONResponse({"error": {"message": "teacher overloaded", "type": "server_error"}}, status_code=status)
        if route == "bad":
            return JSONResponse({"id": "x", "object": "chat.completion", "result": text})
        if route == "slow":
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(self.slow_s)
            with self.lock:
                self.in_flight -= 1
        return JSONResponse(answer_body(text, bool(body.get("logprobs")) and route != "plain"))
