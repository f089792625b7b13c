"""The flwr release iaptnet is written for, and every private part of it iaptnet touches.

flwr 1.42.0 has no public option for what a Trust's node needs, so iaptnet reaches into
private parts of that exact release: the SuperNode adaptations (flower/supernode.py), the
hub's ServerApp pulls (flower/serverapp.py), the hub's warm ServerApp
(flower/warm_serverapp.py, flower/runtime_tasks.py), the hub's SuperLink middleware (flower/superlink.py) and the app
bundle (flower/bundle.py). Why each
exists: docs/developer/flower.md.

`check_flwr()` verifies the installed version and the presence, signature and relied-on source
lines of every private object used (`NEEDS`), and raises `FlowerAdaptationError` naming what
moved. The node daemon and the ServerApp call it before patching, and
tests/test_flower_pins.py calls it on every CI run, so a new flwr fails loudly, never silently.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os as _os
import time as _time
from dataclasses import dataclass

FLWR_VERSION = "1.42.0"
# Benchmarks only (bench/bench_latency.py "before"): keep flwr's own sleeps and backoffs.
STOCK_TIMING_ENV = "IAPTNET_STOCK_FLOWER_TIMING"


def stock_timing() -> bool:
    """Whether a benchmark asked for flwr 1.42 as shipped (STOCK_TIMING_ENV=1)."""
    return _os.environ.get(STOCK_TIMING_ENV) == "1"


class FlowerAdaptationError(RuntimeError):
    """The installed flwr is not the release these adaptations were written for."""


@dataclass(frozen=True)
class _Need:
    module: str
    name: str
    params: tuple[str, ...] | None = None  # leading parameter names, in order; None: not checked
    source_contains: tuple[str, ...] = ()


# Every private (or unstable) flwr object this module and the FAB builder touch.
NEEDS: tuple[_Need, ...] = (
    _Need("flwr.supernode.cli.flower_supernode", "flower_supernode", ()),
    _Need(
        "flwr.supernode.start_client_internal",
        "start_client_internal",
        (
            "state_factory",
            "server_address",
            "node_config",
            "root_certificates",
            "insecure",
            "authentication_keys",
            "max_retries",
            "max_wait_time",
            "isolation",
            "runtime_api_address",
        ),
        # "SuperNode ID:" is the line `iaptnet network up` waits for in each node's log.
        ("time.sleep(3)", "_pull_and_store_message(", "_push_messages(", '"SuperNode ID: %s"'),
    ),
    _Need(
        "flwr.supernode.start_client_internal",
        "_pull_and_store_message",
        (
            "state",
            "object_store",
            "node_config",
            "receive",
            "get_run",
            "get_fab",
            "pull_object",
            "confirm_message_received",
            "trusted_entities",
        ),
        (
            "state.create_task(",
            "return run_id",
            "recv := receive()",
            # a run that ends while its message's objects are pulled leaves the message and its
            # task behind (supernode.py's _drop_ignored ends them)
            "state.store_message(message)",
            "except RunNotRunningException:",
        ),
    ),
    _Need(
        "flwr.supernode.start_client_internal",
        "_push_messages",
        ("state", "object_store", "send", "push_object"),
        # The two waits the TaskTracker ends (supernode.REPLY_WAIT), the second inside the
        # try whose handler drops the reply.
        (
            "time.sleep(0.5)",
            "while not (reply_messages := state.get_messages_legacy(is_reply=True)):",
            'while (content := object_store.get(tree.object_id)) == b"":',
            "except Exception as err:",
        ),
    ),
    # Reconnection (supernode.install_reconnect_adaptations, run_supernode).
    _Need(
        "flwr.supernode.start_client_internal",
        "_init_connection",
        ("server_address", "insecure", "root_certificates", "authentication_keys", "max_retries", "max_wait_time"),
    ),
    _Need(
        "flwr.supernode.fleet_http_connection",
        "http_request_response",
        ("server_address", "insecure", "root_certificates", "authentication_keys", "max_retries", "max_wait_time"),
        (
            "retry_invoker = make_simple_http_retry_invoker()",
            "heartbeat_sender = HeartbeatSender(send_node_heartbeat)",
            "os.kill(os.getpid(), signal.SIGINT)",
            "connection_initialized = True",
            "log(ERROR, exc)",
        ),
    ),
    _Need("flwr.supernode.fleet_http_connection", "make_simple_http_retry_invoker", ()),
    _Need("flwr.supernode.fleet_http_connection", "HeartbeatSender", ("heartbeat_fn",)),
    _Need(
        "flwr.supercore.retry.retry_invoker",
        "RetryInvoker",
        ("wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time", "on_success", "on_backoff"),
        ("self.should_giveup(_exception)", "try_call_event_handler(self.on_backoff)", "self.wait_gen_factory()"),
    ),
    _Need("flwr.supercore.retry", "exponential", ("base_delay", "multiplier", "max_delay")),
    _Need(
        "flwr.supercore.heartbeat",
        "HeartbeatSender",
        ("heartbeat_fn",),
        ("def _heartbeat(self)", "self.heartbeat_fn()", "raise HeartbeatFailure", "self._stop_event"),
    ),
    _Need("flwr.supercore.heartbeat", "HeartbeatFailure"),
    _Need(
        "flwr.supernode.cli.flower_supernode",
        "flower_supernode",
        (),
        (
            "config = _parse_supernode_lifespan_config()",
            "NodeStateFactory(objectstore_factory=objectstore_factory)",
            "_start_supernode_http_api(config, state_factory)",
            "add_exit_handler(stop_http_server)",
            "start_client_internal(",
        ),
    ),
    _Need("flwr.supernode.cli.flower_supernode", "_parse_supernode_lifespan_config", ()),
    _Need("flwr.supernode.cli.flower_supernode", "_start_supernode_http_api", ("config", "state_factory")),
    _Need("flwr.supernode.cli.flower_supernode", "NodeStateFactory"),
    _Need("flwr.supernode.cli.flower_supernode", "ObjectStoreFactory"),
    _Need("flwr.supernode.cli.flower_supernode", "add_exit_handler"),
    _Need("flwr.supernode.cli.flower_supernode", "start_client_internal"),
    _Need("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client",)),
    _Need("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context")),
    _Need("flwr.supernode.runtime.run_clientapp", "push_task_output", ("client", "context", "sub_status", "details")),
    _Need("flwr.supercore.runtime", "RuntimeHttpClient"),
    _Need("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",)),
    _Need("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",)),
    _Need("flwr.supercore.retry", "make_simple_http_retry_invoker", ()),
    _Need("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)),
    _Need("flwr.supercore.constant", "TaskType"),
    _Need("flwr.common.constant", "SubStatus"),
    _Need("flwr.common.constant", "ErrorCode"),
    _Need("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    _Need("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest"),
    _Need(
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_objects",
        (
            "object_ids",
            "pull_object_fn",
            "max_concurrent_pulls",
            "max_time",
            "max_tries_per_object",
            "initial_backoff",
            "backoff_cap",
        ),
    ),
    _Need("flwr.supernode.start_client_internal", "pull_objects"),
    _Need("flwr.superlink.grid.http_grid", "pull_objects"),
    # The hub's session (coordinator/session.py) counts this error, put in place of a reply
    # whose objects never arrived, as the node's missing answer.
    _Need(
        "flwr.superlink.grid.http_grid",
        "HttpGrid",
        None,
        ("code=ErrorCode.MESSAGE_UNAVAILABLE", "reply_to_message_id=msg_proto.metadata.reply_to_message_id"),
    ),
    _Need("flwr.cli.build", "build_fab_from_disk", ("app",)),
    # The hub's warm ServerApp (flower/warm_serverapp.py): what flwr's `run_serverapp` does for
    # one task, done in a forked child with the installed ServerApp.
    _Need(
        "flwr.superlink.runtime.run_serverapp",
        "run_serverapp",
        ("runtime_api_address", "log_queue", "token", "insecure", "certificates"),
        (
            "grid._runtime_client.PullTaskInput(req)",
            "TaskIdentity.task_id = res.task_id",
            "grid.set_run(run)",
            "start_log_uploader(",
            "grid._runtime_client.PushTaskOutput(pushoutput_req)",
            "context.state = RecordDict()",
        ),
    ),
    _Need(
        "flwr.superlink.grid.http_grid", "HttpGrid", ("runtime_api_address", "insecure", "root_certificates", "token")
    ),
    _Need(
        "flwr.server.run_serverapp",
        "run",
        ("grid", "context", "server_app_dir", "server_app_attr", "loaded_server_app"),
    ),
    _Need("flwr.common.config", "get_fused_config_from_fab", ("fab_file", "run")),
    _Need("flwr.common.serde", "context_from_proto", ("context_proto",)),
    _Need("flwr.common.serde", "context_to_proto", ("context",)),
    _Need("flwr.common.serde", "fab_from_proto", ("fab",)),
    _Need("flwr.supercore.logger", "mirror_output_to_queue", ("log_queue",)),
    _Need("flwr.supercore.logger", "start_log_uploader", ("log_queue", "node_id", "run_id", "client")),
    _Need("flwr.supercore.logger", "stop_log_uploader", ("log_queue", "log_uploader")),
    _Need("flwr.supercore.logger", "flush_logs", ("log_queue",)),
    # The run's log uploads (warm_serverapp.LOG_UPLOAD_INTERVAL) and the analyst's log stream
    # (superlink.LOG_STREAM_INTERVAL): module constants read at each wait.
    _Need("flwr.supercore.logger", "LOG_UPLOAD_INTERVAL"),
    _Need("flwr.supercore.logger", "_log_uploader", None, ("time.sleep(LOG_UPLOAD_INTERVAL)",)),
    _Need("flwr.superlink.servicer.control.control_handlers", "LOG_STREAM_INTERVAL"),
    _Need(
        "flwr.superlink.servicer.control.control_handlers", "_stream_logs", None, ("time.sleep(LOG_STREAM_INTERVAL)",)
    ),
    _Need("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", ("client",)),
    _Need("flwr.supercore.exit", "flwr_exit", ("code", "message", "event_type", "event_details")),
    _Need("flwr.supercore.exit", "register_signal_handlers", ("event_type", "exit_message")),
    _Need("flwr.supercore.task_identity", "TaskIdentity"),
    _Need("flwr.proto.runtime_pb2", "PullTaskInputRequest"),
    _Need("flwr.proto.runtime_pb2", "PushTaskOutputRequest"),
    # `--isolation process`: the SuperLink starts no SuperExec (the warm ServerApp serves).
    _Need(
        "flwr.superlink.cli.flower_superlink",
        "SuperLinkLifespan",
        None,
        ("if config.isolation != ISOLATION_MODE_SUBPROCESS:",),
    ),
    # The analyst's side of a run (flower/control.py): flwr's Control API client and requests.
    _Need(
        "flwr.supercore.control.control_http_client",
        "ControlHttpClient",
        None,
        ('path="/v1/control/start-run"', 'path="/v1/control/stream-logs"', 'path="/v1/control/list-runs"'),
    ),
    _Need(
        "flwr.supercore.protobuf.client",
        "ProtobufClient",
        None,
        ("def from_server_address(", "root_certificates: bytes | str | None,", "interceptors: Sequence["),
    ),
    _Need("flwr.cli.cli_client_interceptor", "CliClientHttpInterceptor"),
    _Need("flwr.supercore.fab", "Fab", ("hash_str", "content", "verifications")),
    _Need("flwr.supercore.error", "FlowerError"),
    _Need("flwr.common.serde", "fab_to_proto", ("fab",)),
    _Need("flwr.common.serde", "user_config_to_proto", ("user_config",)),
    _Need("flwr.common.serde", "run_from_proto", ("run_proto",)),
    # The hub's SuperLink (flower/superlink.py): the middleware list create_app takes, and the
    # lines by which each scoped middleware passes other paths straight on.
    _Need("flwr.superlink.cli.flower_superlink", "flower_superlink", ()),
    _Need(
        "flwr.superlink.main",
        "_get_middleware",
        (),
        (
            "Middleware(ControlSensitiveResponseMiddleware)",
            "Middleware(ControlAuthenticationMiddleware)",
            "Middleware(ControlLicenseMiddleware)",
            "Middleware(ControlEventLogMiddleware)",
            "Middleware(NodeAuthMiddleware)",
            "Middleware(FleetEventLogMiddleware)",
        ),
    ),
    _Need(
        "flwr.superlink.main",
        "create_app",
        None,
        ("middleware=_get_middleware()", 'include_router(create_runtime_router("SuperLink"))'),
    ),
    _Need("flwr.superlink.routers.control.middlewares", "_is_control_path", None, ('path.startswith("/v1/control/")',)),
    _Need(
        "flwr.superlink.routers.control.middlewares",
        "ControlSensitiveResponseMiddleware",
        None,
        ("if _is_control_sensitive_route(request):",),
    ),
    _Need(
        "flwr.superlink.routers.control.middlewares",
        "ControlAuthenticationMiddleware",
        None,
        ("if not _is_control_path(request.url.path) or _is_control_auth_route(request):",),
    ),
    _Need(
        "flwr.superlink.routers.control.middlewares",
        "ControlLicenseMiddleware",
        None,
        ("or not _is_control_path(request.url.path):",),
    ),
    _Need(
        "flwr.superlink.routers.control.middlewares",
        "ControlEventLogMiddleware",
        None,
        ("if not _is_control_path(request.url.path) or _is_control_sensitive_route(",),
    ),
    _Need(
        "flwr.superlink.routers.fleet.node_auth",
        "NodeAuthMiddleware",
        None,
        (
            'if request.url.path.startswith("/v1/fleet/") and isinstance(',
            # (all it does there, which the fast path does with the same function)
            "await run_in_threadpool(authenticate_node, request)",
        ),
    ),
    _Need(
        "flwr.superlink.routers.fleet.middlewares",
        "FleetEventLogMiddleware",
        None,
        ('if not request.url.path.startswith("/v1/fleet/"):',),
    ),
    # The Fleet fast path (superlink.FastPath) does what these do for a node's per-round
    # requests, with these same functions, in this order.
    _Need(
        "flwr.superlink.routers.fleet.node_auth",
        "authenticate_node",
        ("request",),
        ("bytes_to_public_key(public_key)", "get_node_id_by_public_key(public_key) != node_id"),
    ),
    _Need("flwr.superlink.routers.fleet.node_auth", "bytes_to_public_key", ("public_key_bytes",)),
    # superlink.own_messages_only replaces this, judging each of the node's messages as it does.
    _Need(
        "flwr.server.superlink.linkstate.in_memory_linkstate",
        "InMemoryLinkState.get_message_ins",
        ("node_id", "limit", "run_id"),
        (
            "for msg_id in list(self.message_ins_store.keys()):",
            "self._check_stored_messages({msg_id})",
            "and msg_ins.metadata.dst_node_id == node_id",
            'and msg_ins.metadata.delivered_at == ""',
            "msg_ins.metadata.delivered_at = delivered_at",
        ),
    ),
    _Need("flwr.supercore.date", "now"),
    _Need("flwr.supercore.error.http", "http_error_translator", ("request", "call_next")),
    _Need(
        "flwr.supercore.protobuf.translation",
        "ProtobufTranslationMiddleware",
        None,
        (
            "self._check_request_media_type(request)",
            "request.state.protobuf_request = self._parse_request(",
            "content=result.SerializeToString(), media_type=PROTOBUF_MEDIA_TYPE",
        ),
    ),
    _Need("flwr.supercore.protobuf.translation", "PROTOBUF_REQUEST_TYPES"),
    _Need("flwr.superlink.dependencies.linkstate", "get_linkstate", ("request",)),
    _Need("flwr.supercore.constant", "FLWR_IN_MEMORY_DB_NAME"),
    _Need("flwr.supercore.constant", "TASK_TOKEN_HEADER"),
    _Need(
        "flwr.supercore.routers.runtime.router",
        "create_runtime_router",
        ("component_name",),
        ("versioned_router.include_router(router)",),
    ),
    _Need("flwr.supercore.dependencies.task", "authenticate_task", ("request", "token", "state")),
    _Need(
        "flwr.supercore.dependencies.runtime", "get_task", None, ("return authenticate_task(request, token, state)",)
    ),
    _Need("flwr.supercore.dependencies.runtime", "get_runtime_state", ("request",)),
    _Need("flwr.supercore.dependencies.runtime", "get_runtime_handlers", ("request",)),
    _Need(
        "flwr.supercore.dependencies.version",
        "VersionDependency",
        None,
        (
            "if incompat_details is None or not self._reject_incompatible:",
            "self._reject_incompatible = reject_incompatible",
        ),
    ),
    # The held poll (supernode.install_pull_hold): the client class the fleet connection
    # makes, and how an interceptor reaches its requests.
    _Need(
        "flwr.supernode.fleet_http_connection",
        "http_request_response",
        None,
        ("FleetHttpClient.from_server_address(", "interceptors=["),
    ),
    _Need(
        "flwr.supercore.protobuf.client",
        "ProtobufClient",
        None,
        (
            "def from_server_address(",
            "context = ProtobufRequestContext(",
            "request=http_request,",
            "self._interceptors = tuple(interceptors)",
        ),
    ),
    # The ServerApp's held pulls of replies (warm_serverapp.hold_reply_pulls).
    _Need(
        "flwr.supercore.runtime.runtime_http_client",
        "RuntimeHttpClient",
        None,
        ('rpc_method="/flwr.proto.Runtime/PullMessages"',),
    ),
    _Need(
        "flwr.superlink.grid.http_grid",
        "HttpGrid",
        None,
        ("def _runtime_client(self)", "self._client = RuntimeHttpClient.from_server_address("),
    ),
    _Need(
        "flwr.supernode.fleet_http_client", "FleetHttpClient", None, ('rpc_method="/flwr.proto.Fleet/PullMessages"',)
    ),
    *(
        _Need("flwr.superlink.routers.fleet.router", name, ("request", "state"))
        for name in (
            "fleet_pull_messages",
            "fleet_push_messages",
            "fleet_pull_object",
            "fleet_push_object",
            "fleet_confirm_message_received",
            "fleet_send_node_heartbeat",
        )
    ),
)


def _get(need: _Need):
    """The object `need` names: a module attribute, or a class's attribute ("Class.name")."""
    obj = importlib.import_module(need.module)
    for part in need.name.split("."):
        obj = getattr(obj, part)
    return obj


def check_flwr() -> None:
    """Raise FlowerAdaptationError unless every flwr internal used here is where we expect it."""
    import flwr

    problems = []
    version = getattr(flwr, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("flwr")
    if version != FLWR_VERSION:
        problems.append(
            f"flwr {version} is installed; iaptnet's node adaptations are written for flwr {FLWR_VERSION} exactly"
        )
    for need in NEEDS:
        where = f"{need.module}.{need.name}"
        try:
            obj = inspect.unwrap(_get(need))  # see through our own patches (functools.wraps)
        except (ImportError, AttributeError):
            problems.append(f"{where} no longer exists")
            continue
        if isinstance(obj, functools.partial):
            obj = obj.func
        if need.params is not None:
            target = obj.__init__ if inspect.isclass(obj) else obj
            try:
                params = [p for p in inspect.signature(target).parameters if p != "self"]
            except (TypeError, ValueError):
                problems.append(f"{where} has no inspectable signature")
                continue
            if params[: len(need.params)] != list(need.params):
                problems.append(f"{where} now takes ({', '.join(params)}), expected ({', '.join(need.params)}, ...)")
        if need.source_contains:
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                problems.append(f"{where}: source not available")
                continue
            for snippet in need.source_contains:
                if snippet not in source:
                    problems.append(f"{where} no longer contains `{snippet}`")
    sci = importlib.import_module("flwr.supernode.start_client_internal")
    if getattr(sci, "time", None) is not _time and not getattr(getattr(sci, "time", None), "iaptnet_proxy", False):
        problems.append("flwr.supernode.start_client_internal no longer imports the time module as `time`")
    fhc = importlib.import_module("flwr.supernode.fleet_http_connection")
    if getattr(fhc, "os", None) is not _os and not getattr(getattr(fhc, "os", None), "iaptnet_proxy", False):
        problems.append("flwr.supernode.fleet_http_connection no longer imports the os module as `os`")
    try:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        AcquireTaskRequest(supported_task_types=["x"])
    except (ImportError, ValueError, TypeError):
        problems.append("AcquireTaskRequest no longer has a 'supported_task_types' field")
    try:
        from flwr.supercore.constant import TaskType

        TaskType.CLIENT_APP  # noqa: B018
    except AttributeError:
        problems.append("flwr.supercore.constant.TaskType.CLIENT_APP no longer exists")
    if problems:
        raise FlowerAdaptationError(
            "iaptnet's node cannot run on this flwr: "
            + "; ".join(problems)
            + ". Install the flwr version pinned in pyproject.toml, or update iaptnet/flower/."
        )


#: What the install functions replaced, to restore it (tests) and not patch twice.
INSTALLED: dict[str, object] = {}
