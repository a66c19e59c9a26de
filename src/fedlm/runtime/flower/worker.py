"""fedlm's long-lived ClientApp process: one per SuperNode, serving every message of the node in one Python process.

Flower runs a ClientApp in a fresh ``flwr-clientapp`` process per message (Flower 1.41: with ``--isolation
subprocess`` the SuperNode's SuperExec starts one per task; ``--isolation process`` expects such processes from
outside), so every message pays Python's start, the imports (torch, transformers, peft) and the model load. fedlm's
SuperNode runs with ``--isolation process`` and this process beside it instead. It does what Flower's SuperExec
and ``flwr-clientapp`` do, with Flower's own functions, but in a loop:

1. acquire the node's next ClientApp task from the SuperNode's Runtime API (``AcquireTask``, as the SuperExec does;
   polled every ``poll_s``),
2. run it as ``flwr-clientapp`` does (:func:`flwr.supernode.runtime.run_clientapp.pull_task_input`, the app bundle
   installed once per FAB, the ClientApp loaded by Flower's loader, called, the reply pushed with
   :func:`~flwr.supernode.runtime.run_clientapp.push_message` and the task closed with its context with
   :func:`~flwr.supernode.runtime.run_clientapp.push_task_output`, a heartbeat while it runs),
3. and go back to 1 without exiting, so the loaded modules and what fedlm's ClientApp keeps between messages
   (:mod:`fedlm.runtime.flower.node_cache`: model, tokenizer, client data) stay.

Each task runs in its own thread, as the SuperExec gives each its own process, so a task whose message never arrives
(Flower 1.41 leaves such a task pending when a run stops while its message is in transfer, e.g. a SuperLink
restarted mid-round) does not hold up the next ones; the ClientApp itself runs one task at a time.

Two hand-offs that a fresh process per message never meets (it starts seconds after its task) are made safe here:
the SuperNode creates a task just before it stores the task's message, so an empty message pull is tried again
(:data:`MESSAGE_WAIT_S`); and the SuperNode may hand out the next task as soon as this one's reply is pushed, before
its context is, so the context state that the last ClientApp call left is kept in this process per run series
(:data:`_latest_state`) and given to the next call, and the reply and the task's output are pushed before the next
call starts.

A ClientApp that raises answers with Flower's own error reply (``CLIENT_APP_RAISED_EXCEPTION``) and the process
serves the next task. The context (Flower's per-node ``context.state``: the client's memory, SecAgg+ state) is pulled
with each task and pushed back after it, as with a fresh process. The process exits when its parent (the SuperNode)
exits; :mod:`~fedlm.runtime.flower.worker_process` restarts it when it dies on its own (e.g. killed for memory): the task it held fails like a
crashed ``flwr-clientapp`` and the next one is served by a fresh process. Runtime dependency installation is not
supported (fedlm's bundles have none; every node has fedlm installed).

Started by :mod:`fedlm.runtime.flower.worker_process` (``fedlm flower supernode`` starts that beside the SuperNode);
with the node's config and partition id it builds the node's session in a thread from the start, while the
handshake is already answered.
"""

from __future__ import annotations

import threading
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedlm.runtime.flower.task_clock import mark_task_acquired, mark_task_pulled

_installed: set[str] = set()  # FAB hashes installed by this process
_app_lock = threading.Lock()  # one ClientApp call at a time: one model, one Flower task identity
_latest_state: dict[int, RecordDict] = {}  # run series id -> the context state the last ClientApp call left
MESSAGE_WAIT_S = 30.0  # how long an acquired task waits for the SuperNode to store its message
_load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    """An HTTP client of the SuperNode's Runtime API on loopback (no TLS), with Flower's retries."""
    interceptors: list[ProtobufClientInterceptor] = [RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker()
    )


def acquire(client: RuntimeHttpClient) -> str | None:
    """The token of the SuperNode's oldest pending ClientApp task, claimed for this process; None if there is none."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(res.token) if res.HasField("task") and res.token else None


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab, int]:
    """The task's message, context, run and app bundle: Flower's ``pull_task_input`` with a short first back-off.

    This process asks for the task as soon as the SuperNode creates it, often before the SuperNode holds the message's
    objects; Flower's pull then waits 1 s, 2 s, 4 s ... between tries, a wait a fresh ``flwr-clientapp`` (seconds of
    imports before it pulls) never meets. Here the tries start 0.05 s apart (at most 1 s). Also the task id."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    deadline = time.monotonic() + MESSAGE_WAIT_S
    while not pulled.messages_list and time.monotonic() < deadline:  # the task was created, its message not yet stored
        time.sleep(0.05)
        pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError(f"No messages received from Runtime API within {MESSAGE_WAIT_S:.0f} s")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=0.05,
        backoff_cap=1.0,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: the deflated message lacks its own id
    return message, context, run, fab, int(res.task_id)


def run_task(address: str, token: str) -> bool:
    """Run one acquired ClientApp task in this process, as ``flwr-clientapp`` does; True if the app answered.

    Tasks run in threads (:func:`serve`): the pulls of two tasks may overlap; the ClientApp runs one task at a time
    (:data:`_app_lock`), with Flower's task identity (run, node, task) set for it and the context state the last call
    left, and its reply and context are pushed before the next call starts."""
    mark_task_acquired()
    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    try:
        try:
            message, context, run, fab, task_id = _pull_task_input(client)
        except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: the task fails, the process serves the next one
            log(ERROR, "ClientApp task input could not be pulled", exc_info=ex)
            push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=f"{type(ex)}:<'{ex}'>")
            return False
        mark_task_pulled()
        with _app_lock:
            return _call_app(client, message, context, run, fab, task_id)
    finally:
        if heartbeat.is_running:  # as flwr-clientapp's exit handler
            heartbeat.stop()
        client.close()


def _call_app(client: RuntimeHttpClient, message: Message, context: Context, run: Run, fab: Fab, task_id: int) -> bool:
    """Call the ClientApp on ``message`` (holding :data:`_app_lock`), push its reply (Flower's error reply if it
    raised) and close the task with the context; True if the app answered."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run.run_id, context.node_id
    if context.series_id in _latest_state:  # newer than the pulled one if the last task's context was not pushed yet
        context.state = _latest_state[context.series_id]
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        if fab.hash_str not in _installed:
            install_from_fab(fab.content, skip_prompt=True)
            _installed.add(fab.hash_str)
        app: ClientApp = _load_client_app(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: any failure of the app becomes an error reply
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        reply = Message(Error(code=code, reason=details), reply_to=message)
    _latest_state[context.series_id] = context.state
    try:
        push_message(client, reply, context)
    except Exception as ex:  # noqa: BLE001 - the task is closed below either way
        log(ERROR, "Failed to push reply message", exc_info=ex)
        status = SubStatus.FAILED
    push_task_output(client=client, context=context, sub_status=status, details=details)
    return status == SubStatus.COMPLETED


def warm_up(config_path: Path, partition_id: int) -> None:
    """Build the node's session (model, tokenizer, data) before the first train message, into the ClientApp's cache
    (a train message that arrives meanwhile waits for this build); a config the node cannot serve is left to the
    first message to refuse."""
    from fedlm.config.io import load_config  # noqa: PLC0415 - heavy imports after the parent monitor is up
    from fedlm.runtime.flower import node_cache  # noqa: PLC0415
    from fedlm.runtime.flower.client_app import client_names, client_of  # noqa: PLC0415
    from fedlm.runtime.flower.node_train import build_node_session  # noqa: PLC0415

    started = time.perf_counter()
    try:
        config = load_config(str(config_path))
        client = client_of(partition_id, client_names(config))
        node_cache.session(config, client, lambda: build_node_session(config, client))
    except Exception as exc:  # noqa: BLE001 - the first message builds it again and answers with the error
        log(INFO, "fedlm worker: no warm-up (%s)", exc)
        return
    log(INFO, "fedlm worker: client %s ready in %.1fs", client, time.perf_counter() - started)


def serve(address: str, poll_s: float = 0.25, parent_pid: int | None = None, config: Path | None = None, partition_id: int | None = None) -> None:
    """Serve the SuperNode at ``address`` until the parent process exits (then SIGINT ends this one)."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    if config is not None and partition_id is not None:  # beside serving: the handshake needs no model
        threading.Thread(target=warm_up, args=(config, partition_id), name="fedlm-warm-up", daemon=True).start()
    acquirer = _client(address, "SuperExec")
    log(INFO, "fedlm worker: serving the SuperNode at %s", address)
    while True:
        token = acquire(acquirer)
        if token is None:
            time.sleep(poll_s)
            continue
        # a thread per task, as Flower's SuperExec starts a process per task: a task whose message never arrives
        # (Flower 1.41 leaves one pending when its run stopped mid-transfer) must not hold up the next ones
        threading.Thread(target=run_task, args=(address, token), name="fedlm-task", daemon=True).start()
