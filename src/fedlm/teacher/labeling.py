"""From a client's records to the prompts it may send, and from the teacher's answers to training examples.

``mode: label`` sends each record's prompt (the conversation before its last answer; never the answer). An answer
becomes a :class:`TaughtExample`: the prompt and the answer through the student's chat template (the loss on the
answer, as :func:`fedlm.data.tokenize.tokenize_conversation`), and, when the teacher gave top-k log-probabilities
whose tokens are exactly the student's tokens of the answer (same tokenizer family), those candidates per answer
token for top-k distillation; otherwise the example is plain sequence-level KD (Kim & Rush 2016).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig
from fedlm.data.formats import Message, detect_format, prompt_and_reference, to_messages
from fedlm.data.prepare import load_split_records, split_among_clients
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_conversation
from fedlm.teacher.client import Answer


@dataclass(frozen=True)
class ClientRecords:
    """A client's prompts (what it may send) and its records' full texts (what the verbatim filter guards)."""

    prompts: list[list[Message]]
    texts: list[str]


@dataclass(frozen=True)
class TaughtExample:
    """A teacher-answered conversation in the student's tokens; ``top[t]`` holds the teacher's (student token id,
    logprob) candidates for the label at position ``t`` (absent: cross-entropy on the label there)."""

    tokens: TokenizedExample
    top: dict[int, list[tuple[int, float]]]


def client_records(config: ExperimentConfig) -> dict[str, ClientRecords]:
    """Each client's prompts and texts, from the same split and partition as its training data (before any
    transform: the teacher never sees inserted canaries)."""
    train, _ = load_split_records(config.data, config.seed)
    part = split_among_clients(train, config.partition, config.seed)
    fmt = detect_format(train, config.data.format, "data.train")
    out: dict[str, ClientRecords] = {}
    for name, indices in zip(part.client_names, part.client_indices):
        prompts, texts = [], []
        for i in indices:
            messages = to_messages(train[i], fmt, config.data.system_prompt, f"data.train example {i}")
            prompts.append(prompt_and_reference(messages)[0])
            texts.append("\n".join(m["content"] for m in messages))
        out[name] = ClientRecords(prompts, texts)
    return out


class Teaching:
    """Turns answers into :class:`TaughtExample` in the student's tokenizer (its decoded vocabulary read once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.vocab: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            self.vocab.setdefault(piece, i)  # the first id of a piece: the alignment check below catches a wrong one

    def example(self, prompt: list[Message], answer: Answer) -> TaughtExample | None:
        """The answered conversation as a training example (None when no answer token fits ``max_length``)."""
        tokens = tokenize_conversation(self.tokenizer, [*prompt, {"role": "assistant", "content": answer.text}], self.max_length)
        if tokens.num_target_tokens == 0:
            return None
        return TaughtExample(tokens, self._aligned_top(tokens, answer))

    def _aligned_top(self, tokens: TokenizedExample, answer: Answer) -> dict[int, list[tuple[int, float]]]:
        """Top-k candidates by label position, when the teacher's tokens are the student's tokens of the answer."""
        if answer.tokens is None or answer.top is None or "".join(answer.tokens) != answer.text:
            return {}
        positions = [t for t, label in enumerate(tokens.labels) if label != IGNORE_INDEX]
        ids = [self.vocab.get(piece) for piece in answer.tokens]
        answer_labels = [tokens.labels[t] for t in positions[: len(ids)]]
        if ids[: len(answer_labels)] != answer_labels:
            return {}  # another tokenizer: sequence-level KD on the text
        top: dict[int, list[tuple[int, float]]] = {}
        for t, candidates in zip(positions, answer.top):
            mapped = [(self.vocab[piece], lp) for piece, lp in candidates if piece in self.vocab]
            if mapped:
                top[t] = mapped
        return top
