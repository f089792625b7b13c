"""The hub's SuperLink, adapted (flwr 1.42.0 exactly; see flower/pins.py): each of its HTTP
middlewares sees only the requests it acts on, and an analyst following a run hears its log
(its results) within 0.1 s instead of 0.5 s.

flwr's SuperLink serves the Control API (the analysts' `flwr` commands), the Fleet API (the
nodes) and the ServerAppIo API (the ServerApp) from one FastAPI app, and puts every request
through eight `BaseHTTPMiddleware` layers. Each layer costs the hub a task group and a pair of
memory streams per request, whether it does anything or not, and the hub's CPU goes into its
requests (bench/bench_hub.py). Four of the layers act only on Control API paths and two only
on Fleet API paths (their own code returns `call_next(request)` at once for any other path);
here each is wrapped so that a request outside its path prefix skips it before any of that
machinery runs. The two that act on every request (the error translator and the protobuf
translation) stay as they are, as does everything each layer does on its own paths: node
authentication still checks every Fleet request's signature.

The requests of every round (a node's pulls and pushes of messages and objects, confirmations
and heartbeats; the ServerApp's pushes and pulls of messages and objects) are most of what a hub
serves, and for them flwr's stack costs several times the work it wraps (routing, dependency
injection, two more `BaseHTTPMiddleware` layers, a thread hand-off per request). `FastPath`
serves those paths directly with flwr's own parts, in flwr's order: the media-type check and
protobuf parse of its translation middleware, the authentication (a node's signature and
identity on every Fleet request, `authenticate_node`; the ServerApp's task token on every
Runtime request, `authenticate_task`), the route's version check, the route's own function,
and flwr's error translator for anything that fails, so a caller sees the same answers, errors
included. Any other request, and every Fleet request when flwr's Fleet event log is on, takes
the stock path.

A node polls the hub for its next task and the ServerApp for the nodes' replies, and between
two rounds most of a node's requests were empty polls. Both ask the hub (header HOLD_HEADER,
`HoldRequest`) to hold an empty poll for up to MAX_HOLD seconds: the fast path answers it the
moment a message for the poller is there with all its objects (`PushBursts`), or empty at the
end of the hold. A node gets its task at once instead of at its next poll, and makes one poll a
round instead of several. A client that does not ask (flwr's own) is answered at once, as flwr
answers it.

`python -m iaptnet.flower.superlink ARGS` runs flwr's `flower-superlink ARGS` in this process
with the adaptation installed (coordinator/hub.py starts the hub this way).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .pins import INSTALLED as _INSTALLED
from .pins import check_flwr

CONTROL, FLEET = "/v1/control/", "/v1/fleet/"

#: The path prefix outside which each flwr middleware passes a request straight on (read from
#: its `dispatch`; tests/test_flower_pins.py checks the source lines that say so).
SCOPES = {
    "ControlSensitiveResponseMiddleware": CONTROL,
    "ControlAuthenticationMiddleware": CONTROL,
    "ControlLicenseMiddleware": CONTROL,
    "ControlEventLogMiddleware": CONTROL,
    "NodeAuthMiddleware": FLEET,
    "FleetEventLogMiddleware": FLEET,
}


class PathScoped:
    """An ASGI middleware that runs `cls` (a BaseHTTPMiddleware) only for HTTP requests whose
    path starts with `prefix`; every other request goes straight to the next app."""

    def __init__(self, app, cls, prefix: str, *args, **kwargs):
        self.app = app
        self.prefix = prefix
        self.inner = cls(app, *args, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
        else:
            await self.inner(scope, receive, send)


#: The requests `FastPath` serves: those a node makes every round (Fleet API) and those
#: the hub's ServerApp makes every round (Runtime API). Registration, activation, the run and
#: its bundle, tasks and logs are rare and take the stock path.
FAST_FLEET_PATHS = (
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/pull-object",
    "/v1/fleet/push-object",
    "/v1/fleet/confirm-message-received",
    "/v1/fleet/send-node-heartbeat",
)
FAST_RUNTIME_PATHS = (
    "/v1/runtime/push-messages",
    "/v1/runtime/pull-messages",
    "/v1/runtime/push-object",
    "/v1/runtime/pull-object",
    "/v1/runtime/confirm-message-received",
)


@dataclass(frozen=True)
class FastRoute:
    """One of flwr's routes as the fast path serves it."""

    api: str  # "fleet" (node authentication) or "runtime" (task-token authentication)
    request_type: type  # its protobuf request
    endpoint: Callable  # the route's own function
    checks: tuple  # the route's dependencies that can refuse a request (version checks)


def fast_routes() -> dict[str, FastRoute]:
    """{path: FastRoute} for FAST_FLEET_PATHS and FAST_RUNTIME_PATHS, read from flwr's own
    routers; raises FlowerAdaptationError when a route needs more than the fast path gives it
    (its parameters and their dependencies are checked against flwr's)."""
    import typing

    from flwr.supercore.dependencies.runtime import RuntimeHandlersDependency, RuntimeStateDependency, TaskDependency
    from flwr.supercore.dependencies.version import VersionDependency
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
    from flwr.superlink.routers.fleet import router as fleet_router

    # (the module, not the APIRouter the package re-exports under the same name)
    runtime_router = importlib.import_module("flwr.supercore.routers.runtime.router")

    from .pins import FlowerAdaptationError

    expected = {
        "fleet": {"state": fleet_router.LinkStateDependency},
        "runtime": {"state": RuntimeStateDependency, "handlers": RuntimeHandlersDependency, "task": TaskDependency},
    }
    # The Runtime routes as create_app mounts them: inside the router create_runtime_router
    # makes, whose dependency is the SuperLink's version check.
    mounted = runtime_router.create_runtime_router("SuperLink")
    sources = {
        "fleet": (fleet_router.router.routes, FAST_FLEET_PATHS, []),
        "runtime": (runtime_router.router.routes, FAST_RUNTIME_PATHS, list(mounted.dependencies)),
    }
    routes = {}
    for api, (candidates, paths, outer) in sources.items():
        for route in candidates:
            if route.path not in paths or "POST" not in route.methods:
                continue
            endpoint = route.endpoint.__wrapped__  # (ProtobufRoute wraps the route's function)
            hints = typing.get_type_hints(endpoint, include_extras=True)
            params = [p for p in inspect.signature(endpoint).parameters if p != "request"]
            if params != list(expected[api]) or any(hints.get(p) != dep for p, dep in expected[api].items()):
                raise FlowerAdaptationError(f"flwr's route {route.path} now takes ({', '.join(params)})")
            dependencies = [d.dependency for d in [*outer, *route.dependencies]]
            if not all(isinstance(d, VersionDependency) for d in dependencies):
                raise FlowerAdaptationError(f"flwr's route {route.path} depends on more than its version check")
            # A version check built not to reject answers nothing: it is left out.
            checks = tuple(d for d in dependencies if d._reject_incompatible)
            routes[route.path] = FastRoute(api, PROTOBUF_REQUEST_TYPES[("POST", route.path)], endpoint, checks)
    missing = sorted(set(FAST_FLEET_PATHS + FAST_RUNTIME_PATHS) - set(routes))
    if missing:
        raise FlowerAdaptationError(f"flwr's routers lack {missing}")
    return routes


@functools.cache
def _flwr():
    """The flwr parts the fast path calls on every request, imported once (and only by the
    hub: a node imports this module for `HoldRequest` alone)."""
    from types import SimpleNamespace

    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, TASK_TOKEN_HEADER
    from flwr.supercore.dependencies.runtime import get_runtime_handlers, get_runtime_state
    from flwr.supercore.dependencies.task import authenticate_task
    from flwr.supercore.error.http import http_error_translator
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.superlink.dependencies.linkstate import get_linkstate
    from flwr.superlink.routers.fleet.node_auth import authenticate_node
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response

    return SimpleNamespace(
        FLWR_IN_MEMORY_DB_NAME=FLWR_IN_MEMORY_DB_NAME,
        TASK_TOKEN_HEADER=TASK_TOKEN_HEADER,
        get_runtime_handlers=get_runtime_handlers,
        get_runtime_state=get_runtime_state,
        authenticate_task=authenticate_task,
        http_error_translator=http_error_translator,
        PROTOBUF_MEDIA_TYPE=PROTOBUF_MEDIA_TYPE,
        ProtobufTranslationMiddleware=ProtobufTranslationMiddleware,
        get_linkstate=get_linkstate,
        authenticate_node=authenticate_node,
        run_in_threadpool=run_in_threadpool,
        Request=Request,
        Response=Response,
    )


def _answer(route: FastRoute, request, message):
    """What flwr's stack does for `message` on `route` once it is parsed: authentication, the
    route's checks, its dependencies and the route's function."""
    f = _flwr()
    if route.api == "fleet":
        f.authenticate_node(request)  # (flwr's NodeAuthMiddleware, before the router)
        for check in route.checks:
            check(request)
        return route.endpoint(request=message, state=f.get_linkstate(request))
    for check in route.checks:
        check(request)
    state = f.get_runtime_state(request)
    handlers = f.get_runtime_handlers(request)
    task = f.authenticate_task(request, request.headers.get(f.TASK_TOKEN_HEADER), state)
    return route.endpoint(request=message, state=state, handlers=handlers, task=task)


#: The request header in which a caller asks the hub to hold an empty poll (seconds).
HOLD_HEADER = "x-iaptnet-hold"
#: The longest hold the hub grants (well inside flwr's 30 s client read timeout).
MAX_HOLD = 10.0
#: Who pushes what another side polls for: the ServerApp's pushes (a round's tasks) end a node's
#: held poll, a node's pushes (its reply) end the ServerApp's.
PUSHES = {
    "/v1/runtime/push-messages": "tasks",
    "/v1/runtime/push-object": "tasks",
    "/v1/fleet/push-messages": "replies",
    "/v1/fleet/push-object": "replies",
}
HELD_POLLS = {"/v1/fleet/pull-messages": "tasks", "/v1/runtime/pull-messages": "replies"}


class HoldRequest:
    """The caller's side of a held poll: a flwr HTTP client interceptor that asks the hub to
    hold each empty `rpc_method` request (a node's poll for tasks, the ServerApp's for
    replies) for `seconds` (a number, or a function giving it at each request)."""

    def __init__(self, seconds, rpc_method: str):
        self.seconds = seconds
        self.rpc_method = rpc_method

    def intercept(self, context, call_next):
        if context.rpc_method == self.rpc_method:
            seconds = self.seconds() if callable(self.seconds) else self.seconds
            context.request.headers[HOLD_HEADER] = f"{max(0.0, seconds):g}"
        return call_next(context)


class PushBursts:
    """Wakes the held polls once messages are there whole: when every object the last
    pushes of messages asked for has been pushed (the hub's answer to a push of messages lists
    them), or else once `quiet` seconds have passed without another push. A poller then pulls
    a message whose objects are all there (an early pull of an object would be a retry)."""

    def __init__(self, quiet: float = 0.02):
        self.quiet = quiet
        self.bursts = 0  # wakes so far
        self.outstanding: set[str] = set()  # objects asked for and not yet pushed
        self._burst_over = None
        self._timer = None

    def expect(self, object_ids) -> None:
        """Messages were pushed; their objects `object_ids` are to follow."""
        self.outstanding.update(object_ids)
        if not self.outstanding:
            self._wake()

    def object_pushed(self, object_id: str) -> None:
        if object_id in self.outstanding:
            self.outstanding.discard(object_id)
            if not self.outstanding:
                self._wake()

    def pushed(self) -> None:
        """A push whose objects are not accounted for: wake once pushes have been quiet."""
        import asyncio

        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet, self._quiet)

    def _quiet(self) -> None:
        self._timer = None
        self.outstanding.clear()  # (what never came will not: a failed push, an ended run)
        self._wake()

    def _wake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.bursts += 1
        if self._burst_over is not None:
            self._burst_over.set()
            self._burst_over = None

    async def wait(self, timeout: float, after: int) -> None:
        """Until a wake after the first `after` wakes, or `timeout` seconds."""
        import asyncio

        if self.bursts > after:
            return
        if self._burst_over is None:
            self._burst_over = asyncio.Event()
        try:
            await asyncio.wait_for(self._burst_over.wait(), timeout)
        except TimeoutError:
            pass


def hub_held(seconds: float, hold: float, empty: bool) -> bool:
    """Whether a poll that asked for `hold` seconds, took `seconds` and came back `empty` (or
    not) was answered by a hub that holds polls: one that brought something, or came back
    empty only after at least half its hold. (An empty answer in less time is a hub that does
    not hold polls: its poller paces itself.)"""
    return hold > 0 and (not empty or seconds >= 0.5 * hold)


def requested_hold(scope) -> float:
    """The seconds the request asks its empty poll to be held (0: none), at most MAX_HOLD."""
    key = HOLD_HEADER.encode("latin-1")
    for name, value in scope.get("headers", ()):
        if name == key:
            try:
                seconds = float(value.decode("latin-1"))
            except (UnicodeDecodeError, ValueError):
                return 0.0
            return min(MAX_HOLD, seconds) if seconds > 0 else 0.0  # (NaN: none)
    return 0.0


class FastPath:
    """An ASGI middleware (outermost of flwr's) that serves FAST_FLEET_PATHS and
    FAST_RUNTIME_PATHS without flwr's middleware stack and router, doing what they do for those
    requests, and holds an empty poll a node asks to be held (module docstring)."""

    def __init__(self, app):
        self.app = app
        self.routes = fast_routes()
        self.bursts = {"tasks": PushBursts(), "replies": PushBursts()}

    async def __call__(self, scope, receive, send) -> None:
        http_post = scope["type"] == "http" and scope["method"] == "POST"
        route = self.routes.get(scope["path"]) if http_post else None
        if route is not None and route.api == "fleet" and getattr(scope["app"].state, "fleet_event_log_plugin", None):
            route = None  # flwr's Fleet event log writes around each request: the stock path
        accounted = False  # a push whose objects the hub has counted (PushBursts)
        if route is None:
            await self.app(scope, receive, send)
        else:
            f = _flwr()
            request = f.Request(scope, receive)
            response = await f.http_error_translator(request, functools.partial(self._serve, route))
            accounted = response.status_code < 400
            await response(scope, receive, send)
        pushes = self.bursts.get(PUSHES.get(scope["path"])) if http_post else None
        if pushes is not None and (not accounted or pushes.outstanding):
            pushes.pushed()  # (uncounted, or objects still to come: wake when pushes are quiet)

    async def _serve(self, route, request):
        f = _flwr()
        translation = f.ProtobufTranslationMiddleware
        translation._check_request_media_type(request)
        message = translation._parse_request(await request.body(), route.request_type)
        request.state.protobuf_request = message

        def handle():
            return _answer(route, request, message)

        def again():  # the same poll once more (a node's already authenticated)
            if route.api == "fleet":
                return route.endpoint(request=message, state=f.get_linkstate(request))
            return _answer(route, request, message)

        # The in-memory state answers in microseconds: no thread hand-off. A database-backed
        # one may wait on its disk, so it runs in a worker thread as flwr runs it.
        inline = getattr(request.app.state.linkstate_factory, "database", None) == f.FLWR_IN_MEMORY_DB_NAME
        run_in_threadpool = f.run_in_threadpool
        path = request.url.path
        awaited = self.bursts.get(HELD_POLLS.get(path))
        seen = awaited.bursts if awaited is not None else 0
        result = handle() if inline else await run_in_threadpool(handle)
        hold = requested_hold(request.scope) if awaited is not None else 0.0
        if hold:
            deadline = time.monotonic() + hold
            while not result.messages_list and (left := deadline - time.monotonic()) > 0:
                await awaited.wait(left, after=seen)
                seen = awaited.bursts
                # A poller gone while held must not be handed (and so lose) a message.
                if await request.is_disconnected():
                    break
                result = again() if inline else await run_in_threadpool(again)
        pushes = self.bursts.get(PUSHES.get(path))
        if pushes is not None:
            if path.endswith("/push-messages"):
                pushes.expect(result.objects_to_push)
            else:
                pushes.object_pushed(message.object_id)
        return f.Response(content=result.SerializeToString(), media_type=f.PROTOBUF_MEDIA_TYPE)


def scoped_middleware(middleware: list) -> list:
    """`middleware` (starlette `Middleware` entries, outermost first) with each layer named in
    SCOPES wrapped in `PathScoped`, and `FastPath` in front of them all; order and
    everything else unchanged."""
    from starlette.middleware import Middleware

    out = [Middleware(FastPath)]
    for entry in middleware:
        prefix = SCOPES.get(getattr(entry.cls, "__name__", ""))
        if prefix is None:
            out.append(entry)
        else:
            out.append(Middleware(PathScoped, entry.cls, prefix, *entry.args, **entry.kwargs))
    return out


#: Seconds between two looks at a run's log for the analyst following it (flwr: 0.5). The
#: results reach the analyst through that stream; each look is an in-memory read at the hub.
LOG_STREAM_INTERVAL = 0.1


def own_messages_only(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
    """`InMemoryLinkState.get_message_ins` (flwr 1.42.0) judging only the polling node's
    messages. flwr's checks every stored message on every node's poll (its expiry, and with
    `FederationManager.filter_nodes` that both ends are still in the federation), so a round
    at N nodes cost N x N checks under the state's lock. The answer is the same messages in the
    same order, each checked as flwr checks it; another node's expired message is deleted at
    that node's own poll or when the ServerApp asks for its reply (`get_message_res` checks the
    messages it is asked about), not at this one."""
    from flwr.supercore.date import now

    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found = []
    with self.lock:
        for msg_id, message in list(self.message_ins_store.items()):
            if message.metadata.dst_node_id != node_id:
                continue
            self._check_stored_messages({msg_id})
            if (
                (msg_ins := self.message_ins_store.get(msg_id))
                and (run_id is None or msg_ins.metadata.run_id == run_id)
                and msg_ins.metadata.delivered_at == ""
            ):
                found.append(msg_ins)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg_ins in found:
        msg_ins.metadata.delivered_at = delivered_at
    return found


def install_superlink_adaptations() -> None:
    """Patch `flwr.superlink.main._get_middleware`, which `create_app` calls when the
    SuperLink starts, the Control API's log-stream interval, node authentication's reading
    of a node's public key, which it did from PEM on every request and now does once per key
    (the key a request claims is still compared with the node's registered one every time),
    and the in-memory state's search for a node's messages (`own_messages_only`)."""
    import flwr.superlink.main as main
    import flwr.superlink.routers.fleet.node_auth as node_auth
    import flwr.superlink.servicer.control.control_handlers as control_handlers
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if "superlink_middleware" in _INSTALLED:
        return
    check_flwr()
    original = main._get_middleware
    _INSTALLED["superlink_middleware"] = original
    _INSTALLED["superlink_log_stream_interval"] = control_handlers.LOG_STREAM_INTERVAL
    _INSTALLED["superlink_public_key"] = node_auth.bytes_to_public_key
    control_handlers.LOG_STREAM_INTERVAL = LOG_STREAM_INTERVAL
    node_auth.bytes_to_public_key = functools.lru_cache(maxsize=4096)(node_auth.bytes_to_public_key)
    stock_get_message_ins = InMemoryLinkState.get_message_ins
    _INSTALLED["superlink_get_message_ins"] = stock_get_message_ins

    @functools.wraps(stock_get_message_ins)
    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
        return own_messages_only(self, node_id, limit, run_id=run_id)

    InMemoryLinkState.get_message_ins = get_message_ins

    @functools.wraps(original)
    def get_middleware():
        return scoped_middleware(original())

    main._get_middleware = get_middleware


def uninstall_superlink_adaptations() -> None:
    import flwr.superlink.main as main
    import flwr.superlink.servicer.control.control_handlers as control_handlers

    original = _INSTALLED.pop("superlink_middleware", None)
    if original is not None:
        main._get_middleware = original
    interval = _INSTALLED.pop("superlink_log_stream_interval", None)
    if interval is not None:
        control_handlers.LOG_STREAM_INTERVAL = interval
    get_message_ins = _INSTALLED.pop("superlink_get_message_ins", None)
    if get_message_ins is not None:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        InMemoryLinkState.get_message_ins = get_message_ins
    public_key = _INSTALLED.pop("superlink_public_key", None)
    if public_key is not None:
        import flwr.superlink.routers.fleet.node_auth as node_auth

        node_auth.bytes_to_public_key = public_key


def main(argv: list[str] | None = None) -> None:
    """flwr's `flower-superlink` with `argv`, adapted (blocks until the SuperLink stops)."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    install_superlink_adaptations()
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
