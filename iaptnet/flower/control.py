"""The hub's Control API, spoken from the analyst's process (flwr 1.42.0; see flower/pins.py).

What `flwr run --stream`, `flwr ls --run-id` and `flwr stop` do for a run, with flwr's own
Control API client and requests, without starting a `flwr` process for each: that process
spent a second or more of CPU importing flwr's command line before its first request, on
every study. The connection is the one the `flwr` command would make for the hub file: the
hub's address, TLS with the network's CA, and the headers flwr's command line sends.

Errors become `NetworkError` with the hub's own sentence on one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..protocol.errors import NetworkError


class HubUnreachable(NetworkError):
    """The hub did not answer (down, restarting, or the connection broke off)."""


class ControlClient:
    """One connection to a hub's Control API."""

    def __init__(self, address: str, ca_cert: Path):
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=Path(ca_cert).read_bytes(),
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_run(self, fab: bytes, config: dict[str, str | float]) -> int:
        """Submit the app bundle `fab` with the run config `config`; the run's id."""
        import hashlib

        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(config),
        )
        response = self._call(self._client.StartRun, request, "did not accept the run")
        if not response.HasField("run_id"):
            raise NetworkError(f"the hub at {self.address} did not accept the run: it gave no run id.")
        return int(response.run_id)

    def log_lines(self, run_id: int) -> Iterator[str]:
        """The run's log, line by line, from its start until the run finishes. Raises
        HubUnreachable when the stream breaks off."""
        import httpx
        from flwr.proto.control_pb2 import StreamLogsRequest

        pending = ""
        try:
            for response in self._client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                pending += response.log_output
                *lines, pending = pending.split("\n")
                yield from lines
        except httpx.HTTPError as exc:
            raise HubUnreachable(f"the log stream of run {run_id} broke off ({_said(exc)}).") from None
        if pending:
            yield pending

    def status(self, run_id: int) -> tuple[str, str]:
        """(status, details) of the run as `flwr ls` shows them, e.g. ('finished:completed', '')."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        response = self._call(self._client.ListRuns, ListRunsRequest(run_id=run_id), "could not say how the run is")
        if run_id not in response.run_dict:
            raise NetworkError(f"run {run_id} not found at the hub.")
        status = run_from_proto(response.run_dict[run_id]).status
        if status.status == "finished":
            return f"{status.status}:{status.sub_status}", status.details
        return status.status, ""

    def stop(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self._call(self._client.StopRun, StopRunRequest(run_id=run_id), "could not stop the run")

    def _call(self, method, request, failing: str):
        import httpx

        try:
            return method(request)
        except httpx.HTTPStatusError as exc:
            raise NetworkError(f"the hub at {self.address} {failing}: {_said(exc)}") from None
        except httpx.HTTPError as exc:
            raise HubUnreachable(f"the hub at {self.address} {failing}: it did not answer ({_said(exc)}).") from None


def _said(exc: Exception) -> str:
    """What the hub said (its public error message) or what went wrong with the connection,
    on one line."""
    import httpx
    from flwr.supercore.error import FlowerError

    if isinstance(exc, httpx.HTTPStatusError):
        error = FlowerError.from_json(exc.response.text)
        if error is not None:
            return " ".join(str(error.message).split())
        return f"HTTP {exc.response.status_code}"
    return " ".join(str(exc).split()) or type(exc).__name__
