"""`iaptnet node status --config node.toml`: one line and an exit code an operator, or a
monitor, can poll.

The node daemon keeps `status.json` in its state folder (`Heartbeat`): its pid, when it
started, its data version, the last time the hub answered it (a poll, a message or a reply
pushed; written at most every few seconds while idle) and, while it answers a task, since when.
The status command reads that file and the node's audit log and prints, for example:

    node trust-a: healthy; daemon running (pid 4242) since 2025-06-02T08:00:01Z; hub answered 2 s ago;
    last audit entry #42 glm.round at 2025-06-02T10:02:11Z; audit head 3f2a9c01b7d4 (log verifies);
    data version 1a2b3c4d5e6f

(on one line). It exits 0 when the daemon is running, the hub answered within `--max-silence`
seconds (or the node has been answering a task for less than that), and the audit log
verifies (crash repairs included); otherwise the line starts `UNHEALTHY:` with the reasons,
and it exits 1. A mistake in node.toml is one sentence and exit 2.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("iaptnet.node")

STATUS_FILE = "status.json"
MAX_SILENCE = 120.0  # seconds without the hub's answer before a node counts as disconnected


class Heartbeat:
    """The daemon's side: `started()` once, then `seen(event)` from the SuperNode's loop each
    time the hub answered ("poll": an empty poll, "message": a task arrived, "reply": the
    answer was delivered), `stopped()` when the daemon exits. Never raises."""

    def __init__(self, path: Path, node: str, data_version: str, every: float = 5.0):
        self.path = Path(path)
        self.every = every
        self._lock = threading.Lock()
        self._written = float("-inf")
        self._state = {
            "node": node,
            "pid": os.getpid(),
            "started": time.time(),
            "data_version": data_version,
            "last_contact": None,
            "task_since": None,
            "stopped": None,
        }

    def started(self) -> None:
        self._save(force=True)

    def seen(self, event: str) -> None:
        now = time.time()
        with self._lock:
            first = self._state["last_contact"] is None
            self._state["last_contact"] = now
            if event == "message":
                self._state["task_since"] = self._state["task_since"] or now
            elif event == "reply":
                self._state["task_since"] = None
        self._save(force=first or event != "poll")

    def stopped(self) -> None:
        with self._lock:
            self._state["stopped"] = time.time()
        self._save(force=True)

    def _save(self, force: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._written < self.every:
                return
            self._written = now
            text = json.dumps(self._state) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=".status-", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the node's status file %s (%s)", self.path, exc.strerror)


# --------------------------------------------------------------------------- the command


def cmd_status(args) -> int:
    from ..protocol.errors import SpecError
    from .audit import AuditLog
    from .config import load_node_file
    from .runtime import NodeConfig, state_folder

    cfg = load_node_file(args.config)
    max_silence = float(args.max_silence)
    if not max_silence > 0:
        raise SpecError(f"--max-silence {args.max_silence}: expected a number of seconds above 0.")
    problems, facts = [], []
    now = time.time()

    daemon = _read_status(cfg.state_dir / STATUS_FILE)
    if daemon is None:
        problems.append(f"the daemon has not run here (no {cfg.state_dir / STATUS_FILE})")
    elif daemon == "invalid":
        problems.append(f"the daemon's status file {cfg.state_dir / STATUS_FILE} cannot be read")
        daemon = None
    else:
        pid = daemon.get("pid")
        if daemon.get("stopped") or not _alive(pid):
            when = daemon.get("stopped")
            problems.append(
                "the daemon is not running" + (f" (it stopped at {_iso(when)})" if when else f" (pid {pid})")
            )
        else:
            facts.append(f"daemon running (pid {pid}) since {_iso(daemon.get('started'))}")
            contact, busy = daemon.get("last_contact"), daemon.get("task_since")
            if isinstance(busy, (int, float)):
                facts.append(f"answering a task for {_ago(now - busy)}")
            if not isinstance(contact, (int, float)):
                problems.append("not connected: the hub has not answered since the daemon started")
            elif now - contact <= max_silence:
                facts.append(f"hub answered {_ago(now - contact)} ago")
            elif isinstance(busy, (int, float)) and now - busy <= max_silence:
                facts.append(f"hub last answered {_ago(now - contact)} ago")
            else:
                what = (
                    f"answering one task for {_ago(now - busy)}" if isinstance(busy, (int, float)) else "not connected"
                )
                problems.append(f"{what}: the hub last answered {_ago(now - contact)} ago")

    policy_dir = None
    if cfg.policy is not None:
        from .policy import load_policy

        policy_dir = load_policy(cfg.policy, production=True).state_dir
    folder = state_folder(NodeConfig.from_mapping(cfg.node_config()), policy_dir) / cfg.name
    audit = AuditLog(folder) if (folder / "audit.jsonl").exists() else None
    if audit is None:
        facts.append("audit log empty (no task answered yet)")
    else:
        last = audit.last_entry()
        if last is not None:
            when = str(last.get("time", ""))[:19]
            facts.append(
                f"last audit entry #{last.get('seq')} {last.get('kind', '')}" + (f" at {when}Z" if when else "")
            )
        result = audit.verify()
        if result.ok:
            repaired = f", {len(result.repairs)} crash repair(s)" if result.repairs else ""
            pending = ", a crash to repair at the next start" if result.pending else ""
            facts.append(f"audit head {result.head[:12]} (log verifies{repaired}{pending})")
        else:
            problems.append(f"audit log FAILED after {result.entries} good entries: {result.problem}")
    if daemon is not None and daemon.get("data_version"):
        facts.append(f"data version {str(daemon['data_version'])[:12]}")

    state = "healthy" if not problems else "UNHEALTHY: " + "; ".join(problems)
    print("; ".join([f"node {cfg.name}: {state}", *facts]))
    return 0 if not problems else 1


def _read_status(path: Path):
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return "invalid"
    return data if isinstance(data, dict) else "invalid"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _iso(t) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
