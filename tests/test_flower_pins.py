"""iaptnet/flower/ reaches into private parts of flwr 1.42.0. This test fails
loudly the day a new flwr moves any of them: the version, each private function's presence and
signature, the sleeps it caps. It also checks the adaptations themselves (sleep caps, patching
and unpatching) without starting any process."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import threading

import pytest

from iaptnet.flower import pins, supernode


def test_installed_flwr_is_the_one_adapted_to():
    import flwr

    assert flwr.__version__ == pins.FLWR_VERSION == "1.42.0"
    pins.check_flwr()  # every private object is where iaptnet/flower/ expects it


def test_every_need_is_present_with_its_signature():
    for need in pins.NEEDS:
        obj = importlib.import_module(need.module)
        for part in need.name.split("."):  # a module's attribute, or a class's ("Class.name")
            obj = getattr(obj, part)
        if need.params:
            target = obj.__init__ if inspect.isclass(obj) else obj
            params = [p for p in inspect.signature(target).parameters if p != "self"]
            assert params[: len(need.params)] == list(need.params), f"{need.module}.{need.name}"
        for snippet in need.source_contains:
            assert snippet in inspect.getsource(obj), f"{need.module}.{need.name}: {snippet}"


def test_a_different_flwr_version_is_refused(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(pins.FlowerAdaptationError, match="flwr 1.43.0 is installed"):
        pins.check_flwr()


def test_a_moved_private_function_is_refused(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.delattr(sci, "_pull_and_store_message")
    with pytest.raises(pins.FlowerAdaptationError, match="_pull_and_store_message no longer exists"):
        pins.check_flwr()


def test_a_changed_signature_or_sleep_is_refused(monkeypatch):
    import flwr.supernode.runtime.run_clientapp as rc

    monkeypatch.setattr(rc, "push_message", lambda client, msg: None)
    with pytest.raises(pins.FlowerAdaptationError, match="push_message now takes"):
        pins.check_flwr()
    monkeypatch.undo()
    needs = list(pins.NEEDS) + [
        pins._Need("flwr.supernode.start_client_internal", "_push_messages", source_contains=("time.sleep(7)",))
    ]
    monkeypatch.setattr(pins, "NEEDS", tuple(needs))
    with pytest.raises(pins.FlowerAdaptationError, match=r"no longer contains `time.sleep\(7\)`"):
        pins.check_flwr()


def test_sleep_policy_caps_flower_sleeps():
    policy = supernode.SleepPolicy(idle_poll=1.0, active_poll=0.1, active_window=60.0)
    assert policy.cap(3) == 1.0  # idle: poll the hub every second, not every 3 s
    policy.touch(run_id=7)
    assert policy.cap(3) == 0.1  # during a study
    policy.period = 4.0  # long rounds (many nodes): poll a fifth of a wait apart
    assert policy.cap(3) == pytest.approx(0.8)
    policy.period = 20.0  # longer than flwr's own 3 s, as the hub serves every poll
    assert policy.cap(3) == pytest.approx(4.0)
    policy.period = 100.0
    assert policy.cap(3) == policy.active_poll_cap == 5.0  # but never more than 5 s
    policy.period = 0.0  # the first round of a study: a fifth of the wait so far
    policy.last_activity -= 4.0
    assert policy.cap(3) == pytest.approx(0.8, abs=0.01)
    policy.last_activity -= 10.0  # ... but never slower than when idle
    assert policy.cap(3) == 1.0
    policy.last_activity -= 51.0
    assert policy.cap(3) == 1.0  # the study is over: idle again
    assert policy.cap(0.5) == policy.reply_poll == 0.01  # waiting for the reply
    assert policy.cap(0.005) == 0.005  # never longer than flwr asked for a short wait


def test_sleep_policy_learns_a_study_s_round_never_across_runs(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(supernode._time, "monotonic", lambda: clock[0])
    policy = supernode.SleepPolicy(idle_poll=1.0, active_poll=0.05, active_window=120.0)
    policy.touch(run_id=1)  # round 1 of run 1
    clock[0] += 2.0  # the node's own work
    policy.replied()
    assert policy.cap(3) == 0.05  # just replied: the next message may come at once
    clock[0] += 8.0  # the other nodes take 8 s more
    assert policy.cap(3) == 1.0  # a fifth of the wait so far, at most idle_poll
    policy.touch(run_id=1)  # round 2: the round took 10 s
    assert policy.period == pytest.approx(10.0)
    policy.replied()
    assert policy.cap(3) == pytest.approx(2.0)  # a fifth of the last round
    clock[0] += 50.0
    policy.touch(run_id=2)  # another run 50 s later: not a 50 s round; the last one sets the pace
    assert policy.period == pytest.approx(10.0)
    policy.replied()
    assert policy.cap(3) == pytest.approx(2.0)

    small = supernode.SleepPolicy(idle_poll=1.0, active_poll=0.05, active_window=120.0)
    small.touch(run_id=1)
    small.replied()
    clock[0] += 0.4
    small.touch(run_id=1)  # a small network: 0.4 s rounds
    small.replied()
    clock[0] += 30.0  # its study is over; the next one is picked up within idle_poll
    assert small.cap(3) == 1.0
    small.touch(run_id=2)
    small.replied()
    assert small.cap(3) == pytest.approx(0.08)  # and its rounds polled at its own pace


def test_after_a_held_empty_poll_the_node_polls_again_at_once_and_after_a_quick_one_it_sleeps():
    policy = supernode.SleepPolicy(idle_poll=1.0, active_poll=0.1, hold=10.0)
    policy.polled(9.98, empty=True)  # the hub held it: the next poll waits at the hub
    assert policy.cap(3) == 0.0
    assert policy.cap(0.5) == policy.reply_poll  # (the wait for the reply is not a poll)
    policy.polled(0.01, empty=True)  # answered at once: a hub that does not hold polls
    assert policy.cap(3) == 1.0
    policy.polled(4.0, empty=False)  # a message came during the hold
    assert policy.cap(3) == 1.0
    stock = supernode.SleepPolicy.flwr_defaults()
    stock.polled(30.0, empty=True)  # flwr as shipped never asks for a hold
    assert stock.hold == 0.0 and stock.cap(3) == 3


def test_the_held_poll_asks_the_hub_on_polls_only():
    import flwr.supernode.fleet_http_connection as fhc
    import httpx

    stock = fhc.FleetHttpClient
    supernode.install_pull_hold(7.0)
    supernode.install_pull_hold(7.0)  # twice: one subclass
    try:
        assert fhc.FleetHttpClient is not stock and fhc.FleetHttpClient.__mro__[1] is stock
        client = fhc.FleetHttpClient.from_server_address("127.0.0.1:1", True, None, [])
        hold = client._interceptors[-1]
        sent = []
        for method in ("/flwr.proto.Fleet/PullMessages", "/flwr.proto.Fleet/PushMessages"):
            request = httpx.Request("POST", "http://hub/x")
            context = type("Context", (), {"rpc_method": method, "request": request})()
            hold.intercept(context, lambda c: sent.append(dict(c.request.headers)))
        assert sent[0]["x-iaptnet-hold"] == "7" and "x-iaptnet-hold" not in sent[1]
    finally:
        supernode.uninstall_pull_hold()
    assert fhc.FleetHttpClient is stock


def test_a_run_of_the_installed_release_is_not_downloaded_and_any_other_bundle_is():
    from iaptnet.flower.bundle import release_fab

    data, digest = release_fab()
    asked = []
    fab = supernode.local_release_fab(lambda fab_hash, run_id: asked.append((fab_hash, run_id)) or "from the hub")
    mine = fab(digest, 7)
    assert asked == [] and mine.hash_str == digest and mine.content == data
    assert hashlib.sha256(mine.content).hexdigest() == digest  # what the node's gate checks
    assert fab("ab" * 32, 8) == "from the hub" and asked == [("ab" * 32, 8)]


def test_install_and_uninstall_patch_only_the_supernode_module():
    import time as real_time

    import flwr.superlink.grid.http_grid as http_grid
    import flwr.supernode.start_client_internal as sci

    original = sci._pull_and_store_message
    original_push = sci._push_messages
    original_pull = sci.pull_objects
    calls = []
    policy = supernode.SleepPolicy()
    supernode.install_supernode_adaptations(policy, lambda: calls.append(1), threading.Lock())
    try:
        assert sci._pull_and_store_message is not original
        assert isinstance(sci.time, supernode._TimeProxy) and sci.time.monotonic is real_time.monotonic
        assert sci.pull_objects.keywords == {
            "initial_backoff": policy.pull_backoff,
            "backoff_cap": policy.pull_backoff_cap,
        }
        assert http_grid.pull_objects is original_pull  # the hub side is separate
        pins.check_flwr()  # still passes with the patches in place
    finally:
        supernode.uninstall_supernode_adaptations()
    assert sci._pull_and_store_message is original and sci.time is real_time
    assert sci._push_messages is original_push
    assert sci.pull_objects is original_pull


def test_refusal_is_a_normal_reply_free_of_data():
    from iaptnet.protocol import messages as m

    reply = m.decode_reply(supernode._refusal_content("site-a", "the Trust has not approved this app bundle"))
    assert reply.status == m.REFUSED and reply.node == "site-a" and reply.code == "app_not_approved"
