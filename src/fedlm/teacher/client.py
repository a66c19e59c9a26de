"""Calling the teacher: ``POST {base_url}/chat/completions`` through the ``openai`` client, at most ``concurrency``
requests in flight, each with a timeout, retried with exponential backoff (``backoff_s * 2^attempt``) on a
connection error, a timeout, HTTP 408/409/429 or 5xx; any other HTTP error fails at once. A request that still fails
raises :class:`TeacherUnavailable` naming the endpoint and the status, which fails the client's round.

An answer must carry ``choices[0].message.content`` as a string; one without it is a :class:`Rejected` (logged and
left out, the round goes on). Top-k log-probabilities (``choices[0].logprobs.content[i].top_logprobs``) are kept
when the endpoint gives them in OpenAI's shape; malformed or absent, the answer is kept without them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import openai

from fedlm.core.errors import FedlmError

Messages = list[dict[str, str]]
RETRY_STATUSES = frozenset({408, 409, 429})


class TeacherUnavailable(FedlmError):
    """The endpoint did not answer a request after every retry (unreachable, timed out, or an HTTP error)."""


@dataclass(frozen=True)
class Answer:
    """A teacher's answer: its text and, when given, its tokens with their top-k (token, logprob) candidates."""

    text: str
    tokens: list[str] | None = None
    top: list[list[tuple[str, float]]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "top": self.top}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Answer:
        top = value.get("top")
        return cls(str(value["text"]), value.get("tokens"), [[(str(t), float(lp)) for t, lp in row] for row in top] if top else None)


@dataclass(frozen=True)
class Rejected:
    """An answer without the expected fields, and what was wrong with it."""

    reason: str


@dataclass(frozen=True)
class TeacherEndpoint:
    """Where the teacher is and how to ask it; ``params`` are the sampling parameters sent with every request."""

    base_url: str
    model: str
    api_key: str | None
    params: dict[str, Any]
    concurrency: int = 4
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    def describe(self) -> str:
        return f"teacher {self.base_url} (model {self.model!r})"


class TeacherClient:
    """The HTTP side of the teacher: one ``openai.OpenAI`` client (its own retries off: fedlm's are counted here)."""

    def __init__(self, endpoint: TeacherEndpoint, sleep: Callable[[float], None] = time.sleep) -> None:
        self.endpoint = endpoint
        self.sleep = sleep
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "none", timeout=endpoint.timeout_s, max_retries=0)

    def ask_all(self, prompts: Sequence[Messages], report: Callable[[int, str, str], None]) -> list[Answer | Rejected]:
        """Every prompt's answer, in order, ``concurrency`` at a time; ``report(i, status, detail)`` is called once
        per request that left (``sent``, ``rejected``, ``failed``). The first :class:`TeacherUnavailable` cancels the
        requests not yet started and is raised once those in flight have finished."""
        results: list[Answer | Rejected | None] = [None] * len(prompts)
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency, thread_name_prefix="fedlm-teacher") as pool:
            futures: dict[Future[Answer | Rejected], int] = {pool.submit(self.ask, p): i for i, p in enumerate(prompts)}
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            failure: BaseException | None = None
            for future, i in futures.items():
                if future.cancelled():
                    continue
                exc = future.exception()
                if exc is not None:
                    report(i, "failed", str(exc))
                    failure = failure or exc
                    continue
                result = future.result()
                report(i, "rejected" if isinstance(result, Rejected) else "sent", result.reason if isinstance(result, Rejected) else "")
                results[i] = result
        if failure is not None:
            raise failure
        return [r for r in results if r is not None]

    def ask(self, messages: Messages) -> Answer | Rejected:
        """One request with its retries: the parsed answer, a :class:`Rejected`, or :class:`TeacherUnavailable`."""
        ep = self.endpoint
        attempts = ep.retries + 1
        for attempt in range(attempts):
            try:
                raw = self._client.chat.completions.with_raw_response.create(model=ep.model, messages=messages, **ep.params)  # type: ignore[arg-type]
                return parse_answer(raw.text)
            except openai.APIStatusError as exc:
                status = f"HTTP {exc.status_code}: {_message(exc)}"
                if exc.status_code not in RETRY_STATUSES and exc.status_code < 500:
                    raise TeacherUnavailable(f"{ep.describe()} failed: {status} (not retried)") from None
            except openai.APITimeoutError:
                status = f"timed out after {ep.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                status = f"unreachable ({exc.__cause__ or exc})"
            except openai.OpenAIError as exc:  # anything else the client raises: not retried
                raise TeacherUnavailable(f"{ep.describe()} failed: {type(exc).__name__}: {exc}") from None
            if attempt + 1 < attempts:
                self.sleep(ep.backoff_s * 2**attempt)
        raise TeacherUnavailable(f"{ep.describe()} failed after {attempts} attempt(s): {status}")


def _message(exc: openai.APIStatusError) -> str:
    """The error message of an OpenAI-shaped error body, else the body's start."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:200]
    return str(exc.message)[:200]


def parse_answer(text: str) -> Answer | Rejected:
    """An OpenAI chat-completion body as an :class:`Answer`, or :class:`Rejected` saying which field is missing."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return Rejected(f"the response is not JSON: {text[:80]!r}")
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Rejected("the response has no `choices`")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return Rejected("the response has no `choices[0].message.content` string")
    tokens, top = _logprobs(choices[0].get("logprobs"))
    return Answer(content, tokens, top)


def _logprobs(value: Any) -> tuple[list[str] | None, list[list[tuple[str, float]]] | None]:
    """(tokens, top-k candidates per token) from ``choices[0].logprobs``, or (None, None) if absent or malformed."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list) or not content:
        return None, None
    tokens: list[str] = []
    top: list[list[tuple[str, float]]] = []
    try:
        for item in content:
            tokens.append(str(item["token"]))
            candidates = item.get("top_logprobs") or [{"token": item["token"], "logprob": item["logprob"]}]
            top.append([(str(c["token"]), float(c["logprob"])) for c in candidates])
    except (KeyError, TypeError, ValueError):
        return None, None
    return tokens, top
