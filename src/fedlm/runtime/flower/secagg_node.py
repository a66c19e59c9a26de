"""The SuperNode's side of SecAgg+ (Bell et al. 2020, Algorithm 1; Bonawitz et al. 2017, Fig. 4), as Flower's own
``secaggplus_mod`` does it: the same :class:`~fedlm.privacy.secagg.client.SecAggClient` as the simulation, its state
kept between the round's messages in Flower's per-node ``context.state`` (pulled and pushed back with every message,
whether the ClientApp is fedlm's long-lived process or a fresh one per message; the private keys and held shares never
leave the node).

* ``query.fedlm_secagg`` (:func:`key_stage`): rounds 0-2 (setup and key advertisement, encrypted shares) and 4
  (the shares that unmask the sum);
* ``train.fedlm_secagg`` (:func:`masked_stage`): round 3 carries the round's task with the shares addressed to this
  node; the node trains (the simulation's trainer and seeds), checks its own update as the server would
  (:func:`fedlm.federation.validation.update_problem`: finite values above all), encodes it as the simulation does
  (:meth:`~fedlm.privacy.secagg.round.SecureAggregation.client_codes`: same seeded rounding, DP clipping and
  distributed noise share) and answers with the masked vector and its metrics only. An update that fails its
  checks is never masked: the node answers with an error and drops out before its masked input.

A node answers a message out of order (a stage it is not at, another round) with an error: it is excluded.
``FEDLM_SECAGG_FAULT="ROUND:STAGE:KIND"`` (tests only) makes the node fail at that stage: ``die`` (kill the SuperNode
and this process before replying), ``malformed`` (a reply with broken fields) or ``replay`` (the reply under the
previous round's header).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from fedlm.core.errors import FedlmError
from fedlm.privacy.secagg import wire
from fedlm.privacy.secagg.client import SecAggClient
from fedlm.privacy.secagg.primitives import TamperedShareError
from fedlm.runtime.flower import secagg_envelope as envelope

STATE = "fedlm_secagg"  # the SecAggClient's record in context.state
REFUSED, FAILED, TAMPERED = 4101, 4102, 4103  # out-of-order or bad message; no update to mask; a tampered share
_AFTER = {"share_keys": "advertise_keys", "masked_input": "share_keys", "unmask": "masked_input"}
FAULT_ENV = "FEDLM_SECAGG_FAULT"


def _load(context: Context, round_num: int, stage: str, index: int) -> SecAggClient:
    """The node's protocol state for ``stage`` of ``round_num``; refuses a message out of order."""
    record: Mapping[str, Any] | None = context.state.config_records.get(STATE)
    if record is None:
        raise FedlmError(f"{stage} of round {round_num} arrived, but this node holds no secure-aggregation state")
    done = (int(record["round"]), str(record["stage"]), int(record["index"]))
    if done != (round_num, _AFTER[stage], index):
        raise FedlmError(
            f"{stage} of round {round_num} (client index {index}) arrived after round {done[0]} stage "
            f"{done[1]} (client index {done[2]}); expected {_AFTER[stage]} of this round first"
        )
    return SecAggClient.from_record(record)


def _save(context: Context, client: SecAggClient, stage: str) -> None:
    record = client.to_record()
    record["stage"] = stage
    context.state[STATE] = record


def key_stage(msg: Message, context: Context) -> Message:
    """Rounds 0-2 and 4 of SecAgg+ on this node: advertise keys, share keys, or reveal unmasking shares."""
    try:
        round_num, stage, index, client = envelope.head(msg.content)
        request = envelope.protocol(msg.content)
        if stage == "advertise_keys":
            secagg = SecAggClient(index)
            reply = secagg.advertise_keys(request)
        elif stage in ("share_keys", "unmask"):
            secagg = _load(context, round_num, stage, index)
            reply = secagg.share_keys(request) if stage == "share_keys" else secagg.unmask(request)
        else:
            raise FedlmError(f"stage {stage!r} is not a key stage (advertise_keys, share_keys, unmask)")
        if stage != "advertise_keys" and secagg.round != round_num:
            raise FedlmError(f"the message is for round {round_num}, the node's protocol state is for round {secagg.round}")
        _save(context, secagg, stage)
    except (FedlmError, envelope.ProtocolMessageError, KeyError, TypeError, ValueError) as exc:
        return Message(Error(REFUSED, f"secure aggregation refused: {exc}"), reply_to=msg)
    return _answer(msg, reply, round_num, stage, index, client)


def masked_stage(msg: Message, context: Context) -> Message:
    """Round 3 on this node: train, check, encode and mask the update; only the masked vector and metrics leave."""
    from fedlm.aggregation.lora import build_lora_mode  # noqa: PLC0415 - torch-heavy, only where training happens
    from fedlm.core.task import NonFiniteLossError  # noqa: PLC0415
    from fedlm.federation.validation import Expectations, update_problem  # noqa: PLC0415
    from fedlm.privacy.secagg.setup import build_secure_aggregation  # noqa: PLC0415
    from fedlm.runtime.flower.messages import META  # noqa: PLC0415
    from fedlm.runtime.flower.node_train import train_on_node  # noqa: PLC0415

    try:
        round_num, stage, index, client = envelope.head(msg.content)
        if stage != "masked_input":
            raise FedlmError(f"a train.{envelope.SECAGG_ACTION} message must be the masked_input stage, got {stage!r}")
        secagg = _load(context, round_num, stage, index)
        local = train_on_node(msg.content, context)
    except (FedlmError, envelope.ProtocolMessageError, KeyError, TypeError, ValueError) as exc:
        return Message(Error(REFUSED, f"secure aggregation refused: {exc}"), reply_to=msg)
    except NonFiniteLossError as exc:
        return Message(Error(FAILED, str(exc)), reply_to=msg)
    update, config = local.update, local.config
    expect = Expectations(round_num, local.task.state, max_num_examples=config.federation.max_num_examples)
    problem = update_problem(update, expect)
    if problem is not None:
        return Message(Error(FAILED, f"rejected on the node before masking: {problem}"), reply_to=msg)
    secure = build_secure_aggregation(config, local.aggregator, len(local.session.data.client_names))
    if secure is None:
        reason = "secure aggregation refused: the node's config has no `privacy.secure_aggregation`"
        return Message(Error(REFUSED, reason), reply_to=msg)
    lora = build_lora_mode(config.aggregation.lora, local.session.initial_state, config.peft.r)
    space = lora.to_server_space(local.task.state, [], {}, {})[0]  # the aggregator's space, as on the server
    codes, outside = secure.client_codes(local.aggregator, space, update)
    try:
        reply = secagg.masked_input(envelope.protocol(msg.content), codes)
    except TamperedShareError as exc:
        return Message(Error(TAMPERED, str(exc)), reply_to=msg)
    except (KeyError, TypeError, ValueError) as exc:
        return Message(Error(REFUSED, f"secure aggregation refused: {exc}"), reply_to=msg)
    _save(context, secagg, stage)
    values = {
        "client_id": update.client_id,
        "round": update.round,
        "num_examples": update.num_examples,
        "metrics": {**update.metrics, "secagg_clipped_coordinates": outside},
    }
    return _answer(msg, reply, round_num, stage, index, client, RecordDict({META: ConfigRecord({"json": json.dumps(values)})}))


def _kill_supernode() -> None:
    """Test fault: SIGKILL the ``flower-supernode`` process this ClientApp runs under (found among its parents)."""
    import psutil  # noqa: PLC0415

    for parent in psutil.Process().parents():
        try:
            if any("flower-supernode" in part or "supernode_process" in part for part in parent.cmdline()):
                os.kill(parent.pid, signal.SIGKILL)
                return
        except psutil.Error:
            continue


def _answer(msg: Message, reply: RecordDict, round_num: int, stage: str, index: int, client: str, extra: RecordDict | None = None) -> Message:
    """The reply under the request's header (or the test fault configured for this stage)."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault and fault.split(":")[:2] == [str(round_num), stage]:
        kind = fault.split(":")[2]
        if kind == "die":  # kill the SuperNode above this ClientApp (its SuperExec follows it), then this process
            _kill_supernode()
            os._exit(1)
        if kind == "malformed":
            reply = wire.message({"garbage": b"\x00"}, wire.vector(reply)[:-1] if wire.VECTOR in reply.array_records else None)
        if kind == "replay":
            round_num -= 1
    return Message(envelope.wrap(reply, round_num, stage, index, client, extra), reply_to=msg)
