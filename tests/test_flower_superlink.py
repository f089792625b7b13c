"""The hub's SuperLink adaptation (iaptnet/flower/superlink.py): each of flwr's HTTP middlewares
sees only the requests it acts on, and everything else about them is as flwr has it.

The network tests (tests/test_flower_network.py) run the adapted SuperLink for real, among them
an unregistered node key refused by the (scoped) node authentication."""

from __future__ import annotations

import warnings

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from iaptnet.flower import superlink


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
    assert len(adapted) == len(original) == 8
    for before, after in zip(original, adapted):
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


def test_install_and_uninstall_patch_only_the_middleware_list_and_the_log_stream_interval():
    import flwr.superlink.main as main
    import flwr.superlink.servicer.control.control_handlers as control_handlers

    original, interval = main._get_middleware, control_handlers.LOG_STREAM_INTERVAL
    superlink.install_superlink_adaptations()
    superlink.install_superlink_adaptations()  # twice: still one layer of wrapping
    try:
        assert main._get_middleware is not original and main._get_middleware.__wrapped__ is original
        assert control_handlers.LOG_STREAM_INTERVAL == superlink.LOG_STREAM_INTERVAL < interval
    finally:
        superlink.uninstall_superlink_adaptations()
    assert main._get_middleware is original and control_handlers.LOG_STREAM_INTERVAL == interval
