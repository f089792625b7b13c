"""The hub's SuperLink adaptation (iaptnet/flower/superlink.py): each of flwr's HTTP middlewares
sees only the requests it acts on, everything else about them is as flwr has it, and the fast
path gives a node the answers flwr's own stack gives, errors included.

The network tests (tests/test_flower_network.py) run the adapted SuperLink for real, among them
an unregistered node key refused by the (scoped) node authentication."""

from __future__ import annotations

import asyncio
import warnings
from base64 import b64encode

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from iaptnet.flower import superlink


def _run(coroutine):
    """asyncio.run in a thread of its own: a test that ran before in this worker (Playwright's
    browser) may leave an event loop running in the main thread, where asyncio.run refuses."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _client(app):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's notice about its httpx test client
        from starlette.testclient import TestClient

        return TestClient(app)


def test_a_scoped_middleware_runs_only_on_its_paths_and_the_request_still_arrives():
    seen: list[str] = []

    class Recording(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            seen.append(request.url.path)
            response = await call_next(request)
            response.headers["x-seen"] = "1"
            return response

    async def echo(request):
        return PlainTextResponse(request.url.path)

    app = Starlette(
        routes=[Route("/v1/fleet/pull", echo, methods=["POST"]), Route("/v1/runtime/pull", echo, methods=["POST"])],
        middleware=[Middleware(superlink.PathScoped, Recording, superlink.FLEET)],
    )
    client = _client(app)
    fleet, runtime = client.post("/v1/fleet/pull"), client.post("/v1/runtime/pull")
    assert (fleet.status_code, fleet.text, fleet.headers.get("x-seen")) == (200, "/v1/fleet/pull", "1")
    assert (runtime.status_code, runtime.text, runtime.headers.get("x-seen")) == (200, "/v1/runtime/pull", None)
    assert seen == ["/v1/fleet/pull"]


def test_flwr_middleware_is_scoped_in_its_own_order():
    import flwr.superlink.main as main

    superlink.install_superlink_adaptations()
    try:
        adapted = main._get_middleware()
    finally:
        superlink.uninstall_superlink_adaptations()
    original = main._get_middleware()
    assert len(original) == 8 and len(adapted) == 9
    assert adapted[0].cls is superlink.FastPath  # in front of all of flwr's
    for before, after in zip(original, adapted[1:]):
        name = before.cls.__name__
        if name in superlink.SCOPES:
            assert after.cls is superlink.PathScoped
            assert after.args[:2] == (before.cls, superlink.SCOPES[name])
        else:  # the error translator and the protobuf translation: every request, as before
            assert (after.cls, after.args, after.kwargs) == (before.cls, before.args, before.kwargs)
    assert {m.cls.__name__ for m in original} >= set(superlink.SCOPES)


def test_the_control_routes_flwr_treats_specially_are_under_the_control_prefix():
    """ControlSensitiveResponseMiddleware acts on these routes only: scoping it to the Control
    prefix keeps all of them."""
    from flwr.superlink.routers.control import middlewares

    routes = middlewares.CONTROL_SENSITIVE_ROUTE_KEYS
    assert routes and all(path.startswith(superlink.CONTROL) for _method, path in routes)


def test_install_and_uninstall_patch_only_the_middleware_list_the_log_stream_interval_key_reading_and_the_poll_search():
    import flwr.superlink.main as main
    import flwr.superlink.routers.fleet.node_auth as node_auth
    import flwr.superlink.servicer.control.control_handlers as control_handlers
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original, interval, read_key, get_message_ins = (
        main._get_middleware,
        control_handlers.LOG_STREAM_INTERVAL,
        node_auth.bytes_to_public_key,
        InMemoryLinkState.get_message_ins,
    )
    superlink.install_superlink_adaptations()
    superlink.install_superlink_adaptations()  # twice: still one layer of wrapping
    try:
        assert main._get_middleware is not original and main._get_middleware.__wrapped__ is original
        assert control_handlers.LOG_STREAM_INTERVAL == superlink.LOG_STREAM_INTERVAL < interval
        assert node_auth.bytes_to_public_key.__wrapped__ is read_key  # (read once per key)
        assert InMemoryLinkState.get_message_ins.__wrapped__ is get_message_ins
    finally:
        superlink.uninstall_superlink_adaptations()
    assert main._get_middleware is original and control_handlers.LOG_STREAM_INTERVAL == interval
    assert node_auth.bytes_to_public_key is read_key and InMemoryLinkState.get_message_ins is get_message_ins


# --------------------------------------------------------------------------------------------
# The Fleet fast path against flwr's own stack


@pytest.fixture(autouse=True)
def _stock_flwr_after_each_test():
    yield
    superlink.uninstall_superlink_adaptations()


def _superlink_app(adapted: bool):
    """flwr's SuperLink app (its state in memory, no lifespan run), as flwr ships it or with
    the hub's adaptations, which stay installed until the test ends."""
    import flwr.superlink.main as main

    superlink.uninstall_superlink_adaptations()
    if adapted:
        superlink.install_superlink_adaptations()
    return main.create_app()


def _signed(private_key, public_key: bytes, **extra) -> dict:
    """The headers flwr's SuperNode sends (NodeAuthHttpInterceptor), then `extra`."""
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import sign_message

    timestamp = now().isoformat()
    headers = {
        "content-type": "application/protobuf",
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key).decode("ascii"),
        TIMESTAMP_HEADER: timestamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(private_key, timestamp.encode("ascii"))).decode("ascii"),
    }
    headers.update(extra)
    return headers


def _answers(adapted: bool, curve) -> list[tuple]:
    """What one SuperLink app answers to the requests of a node whose key is on `curve`, good
    and bad: (path, status, content type, body) each, and whether the heartbeat reached the
    node's state."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, PullObjectRequest, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    app = _superlink_app(adapted)
    state = app.state.linkstate_factory.state()
    private = ec.generate_private_key(curve())
    key = public_key_to_bytes(private.public_key())
    node_id = state.create_node("account", "owner", key, 30.0)
    stranger = generate_key_pairs()[0]
    node = Node(node_id=node_id)
    pull = PullMessagesRequest(node=node).SerializeToString()
    requests = [
        (
            "/v1/fleet/send-node-heartbeat",
            SendNodeHeartbeatRequest(node=node, heartbeat_interval=30).SerializeToString(),
            {},
        ),
        ("/v1/fleet/pull-messages", pull, {}),
        ("/v1/fleet/pull-messages", b"\xff\xff", {}),  # not a protobuf message
        ("/v1/fleet/pull-messages", pull, {"content-type": "text/plain"}),
        ("/v1/fleet/pull-messages", pull, {"signature": "stranger"}),  # signed by another key
        ("/v1/fleet/pull-messages", PullMessagesRequest(node=Node(node_id=node_id + 1)).SerializeToString(), {}),
        ("/v1/fleet/pull-messages", pull, {"unsigned": True}),
        ("/v1/fleet/push-messages", PushMessagesRequest(node=node).SerializeToString(), {}),
        ("/v1/fleet/pull-object", PullObjectRequest(node=node, run_id=7, object_id="ab" * 32).SerializeToString(), {}),
        (
            "/v1/fleet/push-object",
            PushObjectRequest(node=node, run_id=7, object_id="ab" * 32, object_content=b"x").SerializeToString(),
            {},
        ),
        (
            "/v1/fleet/confirm-message-received",
            ConfirmMessageReceivedRequest(node=node, run_id=7, message_object_id="ab" * 32).SerializeToString(),
            {},
        ),
        ("/v1/fleet/get-run", b"", {}),  # not on the fast path: flwr's stack answers it
    ]
    client = _client(app)
    out = []
    for path, body, how in requests:
        if how.get("unsigned"):
            headers = {"content-type": "application/protobuf"}
        else:
            signer = stranger if how.get("signature") == "stranger" else private
            headers = _signed(signer, key, **{k: v for k, v in how.items() if k == "content-type"})
        response = client.post(path, content=body, headers=headers)
        out.append((path, response.status_code, response.headers.get("content-type"), response.content))
    out.append(("online", state.get_node_info(node_ids=[node_id])[0].status))
    return out


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1], ids=["P-256 (iaptnet's keys)", "P-384 (earlier)"])
def test_the_fast_path_answers_a_node_as_flwr_stack_does_errors_included(curve):
    stock, fast = _answers(adapted=False, curve=curve), _answers(adapted=True, curve=curve)
    assert fast == stock
    # (the good requests, then: not protobuf, wrong media type, three failed authentications,
    # requests about a run the hub does not know, and a route off the fast path)
    assert [answer[1] for answer in stock[:-1]] == [200, 200, 400, 415, 401, 401, 401, 500, 500, 500, 500, 401]
    assert stock[-1][1] == "online"  # the heartbeat reached the node's state


def test_the_fast_path_authenticates_before_the_handler_runs(monkeypatch):
    """An unauthenticated request never reaches the endpoint (as flwr's NodeAuthMiddleware)."""
    from flwr.superlink.servicer.fleet import fleet_handlers

    called = []
    original = fleet_handlers.pull_messages
    monkeypatch.setattr(fleet_handlers, "pull_messages", lambda **kw: called.append(1) or original(**kw))
    app = _superlink_app(adapted=True)
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private = ec.generate_private_key(ec.SECP256R1())
    key = public_key_to_bytes(private.public_key())
    node_id = app.state.linkstate_factory.state().create_node("account", "owner", key, 30.0)
    body = PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()
    client = _client(app)
    unsigned = client.post("/v1/fleet/pull-messages", content=body, headers={"content-type": "application/protobuf"})
    assert unsigned.status_code == 401 and called == []
    signed = client.post("/v1/fleet/pull-messages", content=body, headers=_signed(private, key))
    assert signed.status_code == 200 and called == [1]


def _runtime_answers(adapted: bool) -> list[tuple]:
    """What one SuperLink app answers to a ServerApp's requests, good and bad (its task token
    missing, wrong or given twice; an older flwr's version; bad protobuf): (path, status,
    content type, body) each."""
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, PullObjectRequest, PushObjectRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PushAppMessagesRequest
    from flwr.supercore.constant import (
        FLWR_COMPONENT_NAME_METADATA_KEY,
        FLWR_PACKAGE_NAME_METADATA_KEY,
        FLWR_PACKAGE_VERSION_METADATA_KEY,
        NOOP_FEDERATION_ID,
        TASK_TOKEN_HEADER,
        TaskType,
    )

    app = _superlink_app(adapted)
    state = app.state.linkstate_factory.state()
    run_id = state.create_run(None, None, "ab" * 32, {}, NOOP_FEDERATION_ID, None, "account", TaskType.SERVER_APP)
    token = state.claim_task(state.get_tasks(run_ids=[run_id])[0].task_id)
    old_flwr = [
        (FLWR_PACKAGE_NAME_METADATA_KEY, "flwr"),
        (FLWR_PACKAGE_VERSION_METADATA_KEY, "1.20.0"),
        (FLWR_COMPONENT_NAME_METADATA_KEY, "ServerApp"),
    ]
    pull = PullAppMessagesRequest(message_ids=[]).SerializeToString()
    requests = [
        ("/v1/runtime/pull-messages", pull, [(TASK_TOKEN_HEADER, token)]),
        ("/v1/runtime/pull-messages", pull, []),
        ("/v1/runtime/pull-messages", pull, [(TASK_TOKEN_HEADER, "f" * 64)]),
        ("/v1/runtime/pull-messages", pull, [(TASK_TOKEN_HEADER, token), (TASK_TOKEN_HEADER, token)]),
        ("/v1/runtime/pull-messages", pull, [(TASK_TOKEN_HEADER, token), *old_flwr]),
        ("/v1/runtime/pull-messages", b"\xff\xff", [(TASK_TOKEN_HEADER, token)]),
        (
            "/v1/runtime/push-messages",
            PushAppMessagesRequest().SerializeToString(),
            [(TASK_TOKEN_HEADER, token)],
        ),
        (
            "/v1/runtime/push-object",
            PushObjectRequest(run_id=run_id, object_id="ab" * 32, object_content=b"x").SerializeToString(),
            [(TASK_TOKEN_HEADER, token)],
        ),
        (
            "/v1/runtime/pull-object",
            PullObjectRequest(run_id=run_id, object_id="ab" * 32).SerializeToString(),
            [(TASK_TOKEN_HEADER, token)],
        ),
        (
            "/v1/runtime/confirm-message-received",
            ConfirmMessageReceivedRequest(run_id=run_id, message_object_id="ab" * 32).SerializeToString(),
            [(TASK_TOKEN_HEADER, token)],
        ),
    ]
    client = _client(app)
    out = []
    for path, body, headers in requests:
        response = client.post(path, content=body, headers=[("content-type", "application/protobuf"), *headers])
        out.append((path, response.status_code, response.headers.get("content-type"), response.content))
    return out


def test_the_fast_path_answers_the_serverapp_as_flwr_stack_does_errors_included():
    stock, fast = _runtime_answers(adapted=False), _runtime_answers(adapted=True)
    assert fast == stock
    # (a good pull; its token missing, wrong, twice; an older flwr; bad protobuf; an empty push;
    # an object pushed and one pulled without the ServerApp's node; a confirmation)
    assert [answer[1] for answer in stock] == [200, 401, 401, 401, 412, 400, 500, 412, 412, 200]


@pytest.mark.parametrize("path", superlink.FAST_FLEET_PATHS + superlink.FAST_RUNTIME_PATHS)
def test_every_fast_path_is_a_route_of_flwr_with_the_checks_that_can_refuse(path):
    route = superlink.fast_routes()[path]
    api = path.split("/")[2]
    assert route.api == api
    assert route.endpoint.__module__ in ("flwr.superlink.routers.fleet.router", "flwr.supercore.routers.runtime.router")
    assert route.request_type.DESCRIPTOR.full_name.startswith("flwr.proto.")
    # The Fleet API's version check never refuses (flwr builds it so); the Runtime API's does.
    assert [type(c).__name__ for c in route.checks] == ([] if api == "fleet" else ["VersionDependency"])


def test_a_route_that_needs_more_than_the_fast_path_gives_stops_the_hub(monkeypatch):
    from flwr.superlink.routers.fleet import router as fleet_router

    from iaptnet.flower.pins import FlowerAdaptationError

    route = next(r for r in fleet_router.router.routes if r.path == "/v1/fleet/pull-messages")

    def wants_more(request, state, store):  # a new parameter flwr would inject
        raise AssertionError("never called")

    monkeypatch.setattr(route.endpoint, "__wrapped__", wants_more)
    with pytest.raises(FlowerAdaptationError, match="pull-messages now takes"):
        superlink.fast_routes()


def test_with_flwr_fleet_event_log_on_every_request_takes_the_stock_path():
    app = _superlink_app(adapted=True)
    seen = []

    class Plugin:  # flwr's EventLogWriterPlugin interface, as far as the middleware uses it
        def compose_log_before_event(self, **kw):
            seen.append(("before", kw["method_name"]))

        def compose_log_after_event(self, **kw):
            seen.append(("after", kw["method_name"]))

        def write_log(self, entry):
            pass

    app.state.fleet_event_log_plugin = Plugin()
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    private, public = generate_key_pairs()
    key = public_key_to_bytes(public)
    node_id = app.state.linkstate_factory.state().create_node("account", "owner", key, 30.0)
    response = _client(app).post(
        "/v1/fleet/pull-messages",
        content=PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString(),
        headers=_signed(private, key),
    )
    assert response.status_code == 200
    assert seen == [("before", "/v1/fleet/pull-messages"), ("after", "/v1/fleet/pull-messages")]


# --------------------------------------------------------------------------------------------
# Held polls


def test_the_hold_a_request_asks_is_read_capped_and_never_negative():
    def scope(*headers):
        return {"headers": [(k.encode(), v.encode()) for k, v in headers]}

    assert superlink.requested_hold(scope()) == 0.0
    assert superlink.requested_hold(scope((superlink.HOLD_HEADER, "2.5"))) == 2.5
    assert superlink.requested_hold(scope((superlink.HOLD_HEADER, "3600"))) == superlink.MAX_HOLD
    for bad in ("-1", "0", "nan", "soon", ""):
        assert superlink.requested_hold(scope((superlink.HOLD_HEADER, bad))) == 0.0


def _held_polls(monkeypatch, script):
    """Run `script(client, pull, state)` against the adapted SuperLink app in an event loop:
    `pull(hold)` polls as a registered node (asking for `hold` seconds, or not when None) and
    returns (seconds taken, messages received); `state["message"] = True` makes the hub have a
    message for the node from then on."""
    import time

    import httpx
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.superlink.servicer.fleet import fleet_handlers

    state = {"message": False, "pulls": 0}

    def pull_messages(request, state_, store):  # flwr's handler, with a message when asked
        state["pulls"] += 1
        return PullMessagesResponse(messages_list=[ProtoMessage()] if state["message"] else [])

    monkeypatch.setattr(
        fleet_handlers, "pull_messages", lambda request, state, store: pull_messages(request, state, store)
    )
    app = _superlink_app(adapted=True)
    private = ec.generate_private_key(ec.SECP256R1())
    key = public_key_to_bytes(private.public_key())
    node_id = app.state.linkstate_factory.state().create_node("account", "owner", key, 30.0)
    body = PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:

            async def pull(hold):
                extra = {} if hold is None else {superlink.HOLD_HEADER: str(hold)}
                t0 = time.monotonic()
                response = await client.post(
                    "/v1/fleet/pull-messages", content=body, headers=_signed(private, key, **extra)
                )
                assert response.status_code == 200
                parsed = PullMessagesResponse()
                parsed.ParseFromString(response.content)
                return time.monotonic() - t0, len(parsed.messages_list)

            return await script(client, pull, state)

    return _run(main())


def test_an_empty_poll_that_asks_is_held_for_its_seconds_and_one_that_does_not_is_answered_at_once(monkeypatch):
    async def script(client, pull, state):
        return await pull(None), await pull(1.5)

    (quick, none), (held, nothing) = _held_polls(monkeypatch, script)
    assert none == nothing == 0
    # Margins wide enough for a loaded machine: not held is well under the hold's 1.5 s.
    assert quick < 0.75 and 1.5 <= held < 3.5


def test_a_held_poll_is_answered_when_the_serverapp_has_pushed_the_round(monkeypatch):
    import asyncio

    async def script(client, pull, state):
        poll = asyncio.create_task(pull(8))
        await asyncio.sleep(0.3)
        state["message"] = True  # the round's messages are stored, then their objects pushed:
        pulls_before = state["pulls"]
        for _ in range(3):  # a burst of pushes (refused here: no task token; they still end a burst)
            await client.post("/v1/runtime/push-object", content=b"", headers={"content-type": "application/protobuf"})
        took, messages = await poll
        return took, messages, pulls_before

    took, messages, pulls_before = _held_polls(monkeypatch, script)
    assert messages == 1 and 0.3 <= took < 2.0  # not the 8 s of the hold
    assert pulls_before == 1  # held, not polled again, until the burst of pushes ended


def test_held_polls_wake_when_every_object_asked_for_is_pushed_or_else_when_pushes_are_quiet():
    import asyncio
    import time

    async def main():
        bursts = superlink.PushBursts(quiet=0.3)
        t0 = time.monotonic()
        waiter = asyncio.create_task(bursts.wait(5.0, after=0))
        await asyncio.sleep(0.01)
        bursts.expect(["a", "b"])  # a push of messages whose two objects are to follow
        bursts.pushed()
        bursts.object_pushed("a")
        await asyncio.sleep(0.01)
        assert not waiter.done()  # "b" is still to come
        bursts.object_pushed("b")
        await waiter
        precise = time.monotonic() - t0
        seen = bursts.bursts
        t1 = time.monotonic()
        bursts.expect(["c"])  # ... and one that never comes: the quiet wakes the pollers
        bursts.pushed()
        await bursts.wait(5.0, after=seen)
        fallback = time.monotonic() - t1
        seen = bursts.bursts
        bursts.expect([])  # nothing to push: at once
        await asyncio.wait_for(bursts.wait(5.0, after=seen - 1), 0.1)
        return precise, fallback, bursts.outstanding

    precise, fallback, outstanding = _run(main())
    assert precise < 0.2 and 0.3 <= fallback < 1.0 and outstanding == set()


def _stored_messages_taken(monkeypatch, adapted: bool) -> tuple[list, list, list]:
    """Three nodes and three messages for each (node 1's and node 2's second expired, node 1's
    third delivered already), stored in flwr's in-memory state as the ServerApp stores them:
    what each pull takes, in order (with and without a limit, for its run and another), and
    which messages are left stored after node 1's and node 0's pulls and after node 2's."""
    import time

    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.task_identity import TaskIdentity

    app = _superlink_app(adapted)
    state = app.state.linkstate_factory.state()
    nodes = [state.create_node("account", "owner", f"key-{k}".encode(), 30.0) for k in range(3)]
    for node in nodes:
        state.activate_node(node, 30.0)
    run = state.create_run(None, None, "ab" * 32, {}, NOOP_FEDERATION_ID, None, "account", TaskType.SERVER_APP)
    for name, value in {"_run_id": run, "_node_id": SUPERLINK_NODE_ID, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)  # as in the ServerApp's process
    names = {}
    for k in range(9):  # message k is for node k % 3
        message = Message(RecordDict(), nodes[k % 3], "query", ttl=60.0, group_id=str(k))
        message.metadata.__dict__["_message_id"] = message.object_id
        assert state.store_message_ins(message) == message.object_id
        if k in (4, 5):  # expired since: stored two minutes ago with a minute to live
            message.metadata.__dict__["_created_at"] = time.time() - 120.0
        if k == 7:
            message.metadata.__dict__["_delivered_at"] = "2026-12-05T09:00:00+00:00"
        names[message.metadata.message_id] = k

    def pull(node, limit, **run_id):
        return [names[m.metadata.message_id] for m in state.get_message_ins(nodes[node], limit, **run_id)]

    def stored():
        return sorted(names[i] for i in state.message_ins_store)

    taken = [pull(1, 1, run_id=run + 1), pull(1, 1, run_id=run), pull(1, None), pull(0, None), pull(0, None)]
    between = stored()
    taken.append(pull(2, None))
    return taken, between, stored()


def test_a_node_poll_takes_from_the_hub_state_what_flwr_gives_it_judging_only_its_own_messages(monkeypatch):
    (stock, stock_between, stock_left), (fast, fast_between, fast_left) = (
        _stored_messages_taken(monkeypatch, adapted=False),
        _stored_messages_taken(monkeypatch, adapted=True),
    )
    assert fast == stock == [[], [1], [], [0, 3, 6], [], [2, 8]]
    # flwr deletes node 2's expired message at anyone's poll; adapted, at node 2's own
    assert stock_between == [0, 1, 2, 3, 6, 7, 8] and fast_between == [0, 1, 2, 3, 5, 6, 7, 8]
    assert fast_left == stock_left == [0, 1, 2, 3, 6, 7, 8]
