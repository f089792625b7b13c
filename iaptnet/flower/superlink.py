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

`python -m iaptnet.flower.superlink ARGS` runs flwr's `flower-superlink ARGS` in this process
with the adaptation installed (coordinator/hub.py starts the hub this way).
"""

from __future__ import annotations

import functools
import sys

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


def scoped_middleware(middleware: list) -> list:
    """`middleware` (starlette `Middleware` entries, outermost first) with each layer named in
    SCOPES wrapped in `PathScoped`; order and everything else unchanged."""
    from starlette.middleware import Middleware

    out = []
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


def install_superlink_adaptations() -> None:
    """Patch `flwr.superlink.main._get_middleware`, which `create_app` calls when the
    SuperLink starts, and the Control API's log-stream interval."""
    import flwr.superlink.main as main
    import flwr.superlink.servicer.control.control_handlers as control_handlers

    if "superlink_middleware" in _INSTALLED:
        return
    check_flwr()
    original = main._get_middleware
    _INSTALLED["superlink_middleware"] = original
    _INSTALLED["superlink_log_stream_interval"] = control_handlers.LOG_STREAM_INTERVAL
    control_handlers.LOG_STREAM_INTERVAL = LOG_STREAM_INTERVAL

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


def main(argv: list[str] | None = None) -> None:
    """flwr's `flower-superlink` with `argv`, adapted (blocks until the SuperLink stops)."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    install_superlink_adaptations()
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
