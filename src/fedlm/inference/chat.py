"""``fedlm chat``: a terminal conversation with the history kept, answers streamed as they are generated, and
/commands to switch the client or the mix between turns."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from fedlm.config.schema.inference import MIXES
from fedlm.core.errors import FedlmError
from fedlm.data.formats import Message
from fedlm.inference.generate import SamplingParams, chat_prompt, generate
from fedlm.inference.mix import MixedModel, MixSpec

PROMPT = "> "


class ChatSession:
    """One conversation with the run's model under a mix that /commands change."""

    def __init__(self, mixed: MixedModel, spec: MixSpec, params: SamplingParams, system: str | None = None) -> None:
        self.mixed, self.spec, self.params = mixed, spec, params
        self.start: list[Message] = [{"role": "system", "content": system}] if system else []
        self.history: list[Message] = list(self.start)

    def describe(self) -> str:
        """The model that answers, in words."""
        who = "global model" if self.spec.mix == "global" else f"client {self.spec.client}, mix {self.spec.mix}"
        weight = f", weight {self.spec.weight}" if self.spec.mix in ("adapter", "logits") else ""
        return who + weight

    def loop(self, lines: Iterable[str], write: Callable[[str], None]) -> None:
        """Read user turns and /commands from ``lines`` until /quit or the end of input."""
        write(PROMPT)
        for raw in lines:
            line = raw.strip()
            if line in ("/quit", "/exit"):
                return
            if line.startswith("/"):
                write(self.command(line) + "\n")
            elif line:
                self.turn(line, write)
            write(PROMPT)
        write("\n")

    def command(self, line: str) -> str:
        """Apply one /command; returns the line to show (an error is shown, and the session goes on)."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name == "/reset":
                self.history = list(self.start)
                return "history cleared"
            if name == "/client":
                if not arg:
                    return self._switch(replace(self.spec, client=None, mix="global"))
                return self._switch(replace(self.spec, client=arg, mix="local" if self.spec.mix == "global" else self.spec.mix))
            if name == "/mix":
                if arg not in MIXES:
                    raise FedlmError(f"/mix takes one of {', '.join(MIXES)}")
                return self._switch(replace(self.spec, mix=arg))  # type: ignore[arg-type]  # checked against MIXES
            if name == "/weight":
                value: float | str = arg if arg == "auto" else float(arg)
                if isinstance(value, float) and not 0.0 <= value <= 1.0:
                    raise FedlmError("/weight takes a number in [0, 1] or auto")
                return self._switch(replace(self.spec, weight=value))  # type: ignore[arg-type]  # a float or "auto"
            if name == "/help":
                return "/client NAME | /client | /mix global|local|adapter|logits | /weight W|auto | /reset | /quit"
        except ValueError:
            return f"error: /weight takes a number in [0, 1] or auto, got {arg!r}"
        except FedlmError as exc:
            return f"error: {exc}"
        return f"error: unknown command {name}; /help lists them"

    def _switch(self, spec: MixSpec) -> str:
        if spec.client is not None:
            self.mixed.run.client(spec.client)
        self.mixed.check(spec)
        self.spec = spec
        return f"now: {self.describe()}"

    def turn(self, text: str, write: Callable[[str], None]) -> str:
        """Answer one user message (streamed through ``write``) and keep both in the history."""
        self.history.append({"role": "user", "content": text})
        prompt = chat_prompt(self.mixed.run.tokenizer, self.history)
        result = generate(self.mixed, self.spec, [prompt], [self.params], lambda _row, piece: write(piece))[0]
        write("\n")
        self.history.append({"role": "assistant", "content": result.text})
        return result.text
