"""The analyst's side of a run (iaptnet/flower/control.py), without a hub: the log stream comes
back as whole lines however the hub cuts it, a stream that breaks off and a hub that does not
answer are told apart from a hub that answers with an error, and a run's status reads as
`flwr ls` shows it. The network tests (tests/test_flower_network.py) submit and follow runs
through it for real, a lost run and a hub restart among them."""

from __future__ import annotations

import types

import httpx
import pytest
from flwr.common.serde import run_to_proto
from flwr.supercore.run import Run, RunStatus

from iaptnet.flower import control
from iaptnet.protocol.errors import NetworkError


class FakeControl:
    """Stands in for flwr's ControlHttpClient."""

    def __init__(self, chunks=(), break_after=None, runs=None, error=None):
        self.chunks, self.break_after, self.runs, self.error = list(chunks), break_after, runs or {}, error
        self.requests = []

    def StreamLogs(self, request):
        self.requests.append(request)
        for k, chunk in enumerate(self.chunks):
            if self.break_after is not None and k == self.break_after:
                raise httpx.RemoteProtocolError("peer closed connection")
            yield types.SimpleNamespace(log_output=chunk)

    def ListRuns(self, request):
        if self.error:
            raise self.error
        return types.SimpleNamespace(run_dict={k: run_to_proto(v) for k, v in self.runs.items()})

    def close(self):
        pass


def client_with(fake) -> control.ControlClient:
    client = control.ControlClient.__new__(control.ControlClient)
    client.address, client._client = "hub.example:9093", fake
    return client


def test_log_lines_are_whole_however_the_stream_cuts_them():
    fake = FakeControl(["INFO : first li", "ne\nsecond line\nthi", "rd", " line\n", "last without newline"])
    lines = list(client_with(fake).log_lines(7))
    assert lines == ["INFO : first line", "second line", "third line", "last without newline"]
    assert fake.requests[0].run_id == 7


def test_a_stream_that_breaks_off_says_so_after_the_lines_it_gave():
    got = []
    with pytest.raises(control.HubUnreachable, match="the log stream of run 7 broke off"):
        for line in client_with(FakeControl(["one\ntwo\n", "three\n"], break_after=1)).log_lines(7):
            got.append(line)
    assert got == ["one", "two"]


def test_status_reads_as_flwr_ls_shows_it():
    def run(status: str, sub: str = "", details: str = "") -> Run:
        r = Run.create_empty(run_id=7)
        r.status = RunStatus(status, sub, details)
        return r

    assert client_with(FakeControl(runs={7: run("finished", "completed")})).status(7) == ("finished:completed", "")
    assert client_with(FakeControl(runs={7: run("finished", "failed", "ServerApp failed")})).status(7) == (
        "finished:failed",
        "ServerApp failed",
    )
    assert client_with(FakeControl(runs={7: run("running")})).status(7) == ("running", "")


def test_a_hub_that_answers_with_an_error_is_not_a_hub_that_is_down():
    request = httpx.Request("POST", "https://hub.example:9093/v1/control/list-runs")
    refused = httpx.HTTPStatusError(
        "404",
        request=request,
        response=httpx.Response(404, request=request, json={"code": 1, "detail": "Run ID 7 not found"}),
    )
    with pytest.raises(NetworkError, match="could not say how the run is: Run ID 7 not found") as err:
        client_with(FakeControl(error=refused)).status(7)
    assert not isinstance(err.value, control.HubUnreachable)
    down = httpx.ConnectError("connection refused", request=request)
    with pytest.raises(
        control.HubUnreachable, match="could not say how the run is: it did not answer \\(connection refused\\)"
    ):
        client_with(FakeControl(error=down)).status(7)
