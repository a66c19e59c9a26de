"""SecAgg+ protocol messages in Flower messages: a header that binds each one to its round, stage and client, and
the checks the server makes on every reply before the protocol uses it.

A protocol message (:mod:`fedlm.privacy.secagg.wire`: ConfigRecord ``"msg"``, ArrayRecord ``"vec"``) travels in a
Flower ``Message`` whose content also holds the ConfigRecord :data:`HEAD` (``round``, ``stage``, ``index``,
``client``). The node answers under the same header. A reply whose header names another round, stage or client
(a replayed or misrouted message), or whose fields do not have the stage's form, is refused: the server excludes
that node from the round (it has dropped out, as in Bonawitz et al. 2017, Sec. 4) and logs the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedlm.privacy.secagg import wire

SECAGG_ACTION = "fedlm_secagg"  # message types query.fedlm_secagg (rounds 0-2, 4) and train.fedlm_secagg (round 3)
HEAD = "secagg_head"
KEY_BYTES = 32  # X25519 public keys and SHA-256 commitments

# The fields of each stage's reply: name -> kind ("bytes", "ints", "bytes_list").
_REPLY_FIELDS: dict[str, dict[str, str]] = {
    "advertise_keys": {"pk_c": "key", "pk_s": "key", "commit_b": "key"},
    "share_keys": {"dst": "ints", "ciphertexts": "bytes_list"},
    "masked_input": {},
    "unmask": {"ids": "ints", "kinds": "ints", "shares": "bytes_list"},
}


class ProtocolMessageError(ValueError):
    """A protocol message that cannot be used: wrong header, missing or malformed fields."""


def wrap(protocol: RecordDict, round_num: int, stage: str, index: int, client: str, extra: RecordDict | None = None) -> RecordDict:
    """The content of a Flower message carrying ``protocol`` (plus ``extra`` records, e.g. the train task)."""
    records: dict[str, Any] = {HEAD: ConfigRecord({"round": round_num, "stage": stage, "index": index, "client": client})}
    records.update(dict(protocol.items()))
    if extra is not None:
        records.update(dict(extra.items()))
    return RecordDict(records)


def head(content: RecordDict) -> tuple[int, str, int, str]:
    """(round, stage, index, client) of a message; :class:`ProtocolMessageError` if it has no valid header."""
    try:
        h: Mapping[str, Any] = content.config_records[HEAD]
        return int(h["round"]), str(h["stage"]), int(h["index"]), str(h["client"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolMessageError(f"no valid secure-aggregation header ({type(exc).__name__}: {exc})") from None


def protocol(content: RecordDict) -> RecordDict:
    """The protocol message inside ``content`` (its ``msg`` and ``vec`` records)."""
    records: dict[str, Any] = {wire.CONFIG: content.config_records.get(wire.CONFIG, ConfigRecord({}))}
    if wire.VECTOR in content.array_records:
        records[wire.VECTOR] = content.array_records[wire.VECTOR]
    return RecordDict(records)


def reply_problem(content: RecordDict, round_num: int, stage: str, index: int, length: int) -> str | None:
    """Why a node's reply to ``stage`` of round ``round_num`` (sent to client ``index``) cannot be used, or None."""
    try:
        got = head(content)
    except ProtocolMessageError as exc:
        return str(exc)
    if got[:3] != (round_num, stage, index):
        return (
            f"the reply is for round {got[0]} stage {got[1]} client index {got[2]}, expected round {round_num} stage "
            f"{stage} client index {index} (a replayed or misrouted message)"
        )
    try:
        _check_fields(content, stage, length)
    except (ProtocolMessageError, KeyError, TypeError, ValueError) as exc:
        return f"malformed {stage} reply: {exc}"
    return None


def _check_fields(content: RecordDict, stage: str, length: int) -> None:
    fields = wire.fields(content)
    for name, kind in _REPLY_FIELDS[stage].items():
        value = fields[name]
        if kind == "key" and not (isinstance(value, bytes) and len(value) == KEY_BYTES):
            raise ProtocolMessageError(f"field {name} must be {KEY_BYTES} bytes")
        if kind == "ints" and not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            raise ProtocolMessageError(f"field {name} must be a list of integers")
        if kind == "bytes_list" and not (isinstance(value, list) and all(isinstance(v, bytes) for v in value)):
            raise ProtocolMessageError(f"field {name} must be a list of bytes")
    if stage == "share_keys" and len(fields["dst"]) != len(fields["ciphertexts"]):
        raise ProtocolMessageError("fields dst and ciphertexts differ in length")
    if stage == "unmask":
        if not len(fields["ids"]) == len(fields["kinds"]) == len(fields["shares"]):
            raise ProtocolMessageError("fields ids, kinds and shares differ in length")
        if any(k not in (0, 1) for k in fields["kinds"]):
            raise ProtocolMessageError("field kinds must hold 0 (self-mask share) or 1 (mask-key share)")
    if stage == "masked_input":
        array = content.array_records[wire.VECTOR]["masked"]
        if array.dtype != "uint32":
            raise ProtocolMessageError(f"the masked vector must be uint32, got {array.dtype}")
        if tuple(array.shape) != (length,):
            raise ProtocolMessageError(f"the masked vector has shape {tuple(array.shape)}, expected ({length},)")
