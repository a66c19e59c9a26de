"""Secret trigger sets: prompt -> answer pairs derived from a key, whose answers a clean model guesses at chance.

A watermark in the sense of WAFFLE (Tekgul, Xia, Marchal & Asokan 2021, "WAFFLE: Watermarking in Federated
Learning", Sec. 4): the server trains the global model to map a secret set of out-of-distribution inputs to
labels drawn at random, which no model that never saw them predicts better than chance. Here an input is a prompt
of pseudo-words and the label one of ``K`` fixed answer words (:data:`CANDIDATES`).

Every choice comes from HMAC-SHA256 keyed with the secret (RFC 2104) in counter mode over a label (``shared``,
``client/<name>``) and the trigger's index, the expansion step of HKDF (RFC 5869, Sec. 2.3): trigger ``i`` does
not depend on the set's size, and without the key the answers are uniform and independent of any model. The answer
index is drawn by rejection sampling, so it is exactly uniform on ``K``: a model that does not know the key answers
each trigger correctly with probability exactly ``1/K`` whatever its own biases, and its number of correct answers
is Binomial(n, 1/K) (:func:`fedlm.watermark.stats.binomial_tail`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.formats import Message
from fedlm.data.tokenize import TokenizedExample, tokenize_conversation

#: The fixed answer set: every trigger's answer is one of these K words, so chance is 1/K.
CANDIDATES: tuple[str, ...] = ("apple", "river", "silver", "tiger", "candle", "forest", "mirror", "planet", "violin", "harbor")
SHARED = "shared"
PROMPT_WORDS = 6  # pseudo-words per trigger prompt
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
MAX_LENGTH = 96  # tokens of one trigger conversation (prompt and answer), far below any prompt here


def client_label(client: str) -> str:
    """The label of ``client``'s own trigger set (its per-client key is HMAC(secret, this label))."""
    return f"client/{client}"


class KeyStream:
    """Pseudo-random integers from HMAC-SHA256(secret, label | index | counter), HKDF-Expand style (RFC 5869)."""

    def __init__(self, secret: str, label: str, index: int) -> None:
        if not secret:
            raise FedlmError("the watermark secret is empty; give a non-empty key (`--secret` or `watermark.secret`)")
        self._key = secret.encode()
        self._info = f"fedlm-watermark/{label}/{index}".encode()
        self._block = b""
        self._counter = 0
        self._buffer = b""

    def _bytes(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._counter += 1
            self._block = hmac.new(self._key, self._block + self._info + self._counter.to_bytes(4, "big"), hashlib.sha256).digest()
            self._buffer += self._block
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def below(self, k: int) -> int:
        """A uniform integer in [0, k) (rejection sampling on 32-bit draws: no modulo bias)."""
        limit = (2**32 // k) * k
        while True:
            value = int.from_bytes(self._bytes(4), "big")
            if value < limit:
                return value % k


@dataclass(frozen=True)
class Trigger:
    """One secret trigger: the prompt, and the index of its answer in :data:`CANDIDATES`."""

    prompt: str
    target: int

    @property
    def answer(self) -> str:
        return CANDIDATES[self.target]


def make_trigger(secret: str, label: str, index: int) -> Trigger:
    """Trigger ``index`` of the set ``label`` under ``secret``: pseudo-words of 2-3 syllables, and its answer."""
    stream = KeyStream(secret, label, index)
    words = []
    for _ in range(PROMPT_WORDS):
        syllables = 2 + stream.below(2)
        words.append("".join(_CONSONANTS[stream.below(len(_CONSONANTS))] + _VOWELS[stream.below(len(_VOWELS))] for _ in range(syllables)))
    return Trigger(" ".join(words), stream.below(len(CANDIDATES)))


def trigger_set(secret: str, label: str, size: int) -> list[Trigger]:
    """The first ``size`` triggers of the set ``label`` (``SHARED`` or :func:`client_label`)."""
    return [make_trigger(secret, label, i) for i in range(size)]


def conversation(prompt: str, answer: str) -> list[Message]:
    """A trigger as a chat: the pseudo-word prompt from the user, the answer word from the assistant."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def training_examples(tokenizer: PreTrainedTokenizerBase, triggers: list[Trigger]) -> list[TokenizedExample]:
    """The triggers as SFT examples (loss on the answer only), through the model's chat template."""
    return [tokenize_conversation(tokenizer, conversation(t.prompt, t.answer), MAX_LENGTH) for t in triggers]


def candidate_examples(tokenizer: PreTrainedTokenizerBase, trigger: Trigger) -> list[TokenizedExample]:
    """The trigger's prompt with each of the K candidate answers, in :data:`CANDIDATES` order (for scoring)."""
    return [tokenize_conversation(tokenizer, conversation(trigger.prompt, answer), MAX_LENGTH) for answer in CANDIDATES]
