"""SecAgg messages as Flower records, serialised as Flower serialises them.

Every protocol message is a ``flwr.common.RecordDict`` (a ``ConfigRecord`` ``"msg"`` of ints, bytes and lists of
them; an ``ArrayRecord`` ``"vec"`` for the masked vector), the form Flower's ``Message`` carries, so the deployment
runtime can send the same messages. The simulation passes each one through :func:`to_bytes`/:func:`from_bytes`
(Flower's protobuf serde), so nothing but bytes crosses from a client to the server, and the byte count is real.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.common import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

CONFIG, VECTOR = "msg", "vec"


def message(fields: dict[str, Any], vector: np.ndarray | None = None) -> RecordDict:
    """A protocol message: ``fields`` (ints, bytes, lists of them) and optionally one uint32 vector."""
    records: dict[str, Any] = {CONFIG: ConfigRecord(fields)}
    if vector is not None:
        records[VECTOR] = ArrayRecord({"masked": Array(np.ascontiguousarray(vector))})
    return RecordDict(records)


def fields(msg: RecordDict) -> Mapping[str, Any]:
    """The scalar and byte fields of a message (their kinds are checked where each is read)."""
    record = msg[CONFIG]
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"a SecAgg message's {CONFIG!r} record is a {type(record).__name__}, not a ConfigRecord")
    return cast(Mapping[str, Any], record)


def vector(msg: RecordDict) -> np.ndarray:
    """The uint32 vector of a message."""
    record = msg[VECTOR]
    array = record["masked"] if isinstance(record, ArrayRecord) else None
    if not isinstance(array, Array):
        raise ValueError(f"a SecAgg message's {VECTOR!r} record holds no array 'masked'")
    return np.asarray(array.numpy(), dtype=np.uint32)


def to_bytes(msg: RecordDict) -> bytes:
    """Flower's protobuf encoding of ``msg``."""
    return recorddict_to_proto(msg).SerializeToString()


def from_bytes(blob: bytes) -> RecordDict:
    """The message :func:`to_bytes` encoded."""
    return recorddict_from_proto(RecordDictProto.FromString(blob))
