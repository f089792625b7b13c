"""The node's audit log and its memory, kept in the policy's `state_dir` (per node name).

`audit.jsonl` is append-only and hash-chained: one JSON line per task with the time, the
task's id, kind, study hash and round, a digest of its parameters, its status, and exactly
what was released (every payload value and every array element, as sent) or the refusal or
error; `prev` is the previous entry's hash and `hash` = sha256(prev + canonical JSON of the
entry without `hash`). `audit.head` holds the last sequence number and hash, so deleting
entries from the end is detected as well as editing or deleting any entry. `iaptnet node
audit --verify` checks both.

A crash at any instant of an append leaves a state the node repairs when it opens the log
(a torn final line removed, a head one entry behind rolled forward), recording what it
repaired in an `audit.recovery` entry; `--verify` reports those as crash repairs, not as
tampering (`AuditLog`). Every reply carries the head after its task (the anchor), results.json
records it per node, and `--verify --against results.json` checks that the chain still holds
those entries, which catches a log edited and re-chained after the fact (`read_anchors`).

The memory (`memory.json`, `rowsets/`) is what the node must remember between tasks: task
ids it has answered (replay), tasks per study and studies today (volume limits), and a
bitmap of every row set it has released model statistics on (the subset rule). Without a
state folder (a local network's node with no policy file) all of it lives in memory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..protocol.errors import DataError, SpecError
from .disclosure import Violation
from .policy import Rules
from .release_memory import Footprint, MemoryDamaged, ReleaseMemory
from .span import SpanMemory

GENESIS = "0" * 64

log = logging.getLogger("iaptnet.node")

try:  # POSIX advisory locks; other systems rely on the in-process lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def entry_hash(prev: str, entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256((prev + canonical(body)).encode()).hexdigest()


def digest_parameters(payload: dict, arrays: dict[str, np.ndarray]) -> str:
    """sha256 of a task's parameters: its JSON payload and its arrays (dtype, shape, bytes)."""
    h = hashlib.sha256(canonical(payload).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float64))
        h.update(f"\0{name}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def arrays_for_log(arrays: dict[str, np.ndarray]) -> dict:
    """Each released array as its shape and its values' bytes (float64, little-endian,
    row-major) in base64: exact to the bit, and about a tenth of the time and half the
    space of the numbers as JSON text, which was a tenth of a node's work at 178
    coefficients (`logged_array` reads it back)."""
    return {
        name: {
            "shape": list(np.shape(a)),
            "f8_base64": base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode("ascii"),
        }
        for name, a in sorted(arrays.items())
    }


def logged_array(logged: dict) -> np.ndarray:
    """An array as the audit log holds it (`arrays_for_log`; logs written by release 0.2.0 and
    earlier hold its numbers as a JSON list under "values"). DataError for one that is not
    (`entry_problem` reports such an entry as a damaged line)."""
    problem = _array_problem(logged)
    if problem:
        raise DataError(f"not a valid logged array: it {problem}.")
    if "f8_base64" in logged:
        try:
            data = binascii.a2b_base64(logged["f8_base64"], strict_mode=True)
        except ValueError:  # (binascii.Error)
            raise DataError("not a valid logged array: it has values that are not base64 text.") from None
        flat = np.frombuffer(data, dtype="<f8")
    else:
        flat = np.asarray(logged["values"], dtype=float)
    return flat.reshape(logged["shape"])


def now_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str, prefix: str = ".tmp-") -> None:
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the audit log

RECOVERY = "audit.recovery"  # the kind of an entry recording a crash repair
DAMAGE = "audit.damage"  # ... recording damage a crash cannot produce (tampering)
_HEAD_TMP = ".audit.head.tmp-"


class AuditUnreadable(DataError):
    """The log's end cannot be read, so the node cannot chain a new entry onto it."""


@dataclass(frozen=True)
class Anchor:
    """A node's audit head as recorded outside the node: `results.json` of a study."""

    source: str  # the results file
    study: str
    seq: int
    hash: str


@dataclass
class Verification:
    ok: bool
    entries: int
    head: str
    problem: str = ""
    seq: int = 0  # the last entry's sequence number
    repairs: list[str] = field(default_factory=list)  # crash repairs recorded in the log
    pending: str = ""  # a crash state the node repairs when it next opens the log
    anchored: int = 0  # anchors checked


class AuditLog:
    """Append-only, hash-chained. `folder=None` keeps the entries in memory.

    An append writes the entry's line (fsync), then replaces the head file (fsync). A process
    killed at any instant leaves one of: the log as it was; a torn final line (part of the new
    line); the whole line with the head one entry behind. `recover()` (the node runs it when it
    opens its log, and every append checks first) removes a torn line, rolls a lagging head
    forward and appends a recovery entry saying what it repaired. Anything else (a head ahead
    of a clean log end, a head further behind, a missing head, a last entry that does not match
    its hash) is not what a crash leaves: it is recorded in an `audit.damage` entry, so that
    the log never verifies again, and the node chains on from the log's last entry.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._memory: list[str] = []
        self._memory_head: tuple[int, str] = (0, GENESIS)
        self._known: tuple | None = None  # (log file identity, head) after our last append
        self._repair_entry: dict | None = None  # the recovery or damage entry the last settle wrote
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / "audit.jsonl"

    @property
    def head_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "audit.head"

    def _locked(self):
        return _file_lock(self.folder / "audit.lock") if self.folder else contextlib.nullcontext()

    def append(self, fields: dict) -> dict:
        """Chain and write one entry; returns it (with seq, prev and hash). A crash state left
        by an earlier process is repaired (and recorded) first."""
        with self._lock, self._locked():
            if self.folder is None:
                seq, prev = self._memory_head
            else:
                seq, prev = self._settle()
            return self._write(fields, seq, prev)

    def recover(self) -> dict | None:
        """Repair what a crash left (see the class); returns the recovery or damage entry
        written, or None when the log was sound."""
        if self.folder is None:
            return None
        with self._lock, self._locked():
            self._known = None  # look at the files whatever this object wrote last
            self._settle()
            return self._repair_entry

    # -- writing
    def _write(self, fields: dict, seq: int, prev: str) -> dict:
        entry = {"seq": seq + 1, **fields, "prev": prev}
        # The body is serialised once: hashed, then written with the hash appended (the
        # line is the canonical body plus its hash; verify() re-serialises the body).
        body = canonical(entry)
        entry["hash"] = hashlib.sha256((prev + body).encode()).hexdigest()
        line = body[:-1] + ',"hash":' + json.dumps(entry["hash"]) + "}\n"
        if self.folder is None:
            self._memory.append(line)
            self._memory_head = (entry["seq"], entry["hash"])
            return entry
        with open(self.path, "ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
        head = json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n"
        _write_atomic(self.head_path, head, prefix=_HEAD_TMP)
        _fsync_folder(self.folder)
        self._known = (_identity(self.path), (entry["seq"], entry["hash"]))
        return entry

    def _head_file(self) -> tuple[int, str] | str:
        """(seq, hash) of the head file, "missing" or "invalid"."""
        try:
            head = json.loads(self.head_path.read_text())
            seq, hash_ = head["seq"], head["hash"]
        except FileNotFoundError:
            return "missing"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return "invalid"
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(hash_, str):
            return "invalid"
        return seq, hash_

    def _settle(self) -> tuple[int, str]:
        """(seq, hash) the next entry chains on, after repairing (and recording) a crash state;
        the caller holds the lock."""
        head = self._head_file()
        if isinstance(head, tuple) and self._known == (_identity(self.path), head):
            return head  # the files are as our last append left them
        self._repair_entry = None
        for stray in self.folder.glob(_HEAD_TMP + "*"):
            stray.unlink(missing_ok=True)  # a head replacement interrupted before its rename
        size, fragment, line = _read_tail(self.path)
        state = _classify(head, line, fragment)
        if state.unreadable:
            raise AuditUnreadable(
                f"the audit log {self.path} cannot be continued: {state.unreadable}; restore the state "
                "folder from its backup."
            )
        if fragment:
            with open(self.path, "r+b") as fh:
                fh.truncate(size)
                fh.flush()
                os.fsync(fh.fileno())
        seq, prev = state.chain
        if not state.repairs and not state.damage:
            self._known = (_identity(self.path), head)
            return seq, prev
        fields = {"time": now_iso(time.time()), "node": self.folder.name}
        if state.damage:
            fields.update(kind=DAMAGE, status="damaged", damage=state.damage, repairs=state.repairs)
            log.error("audit log %s: %s", self.path, state.damage)
        else:
            fields.update(kind=RECOVERY, status="recovered", repairs=state.repairs)
            log.warning(
                "audit log %s repaired after a crash: %s", self.path, "; ".join(r["sentence"] for r in state.repairs)
            )
        entry = self._write(fields, seq, prev)
        self._repair_entry = entry
        return entry["seq"], entry["hash"]

    # -- reading
    def _raw_lines(self) -> Iterator[bytes]:
        if self.folder is None:
            for line in list(self._memory):
                yield line.encode()
            return
        try:
            with open(self.path, "rb") as fh:
                yield from fh
        except FileNotFoundError:
            return

    def lines(self) -> Iterator[str]:
        for raw in self._raw_lines():
            yield raw.decode(errors="replace")

    def scan(self) -> Iterator[tuple[int, dict | None, str]]:
        """(line number, entry or None, what is wrong with the line) for every line; never
        raises on a damaged log."""
        for number, raw in enumerate(self._raw_lines(), 1):
            if not raw.endswith(b"\n"):
                yield (
                    number,
                    None,
                    "the last line is torn (the node stopped while writing it); the node removes it "
                    "and records a recovery entry when it next starts",
                )
                return
            if not raw.strip():
                yield number, None, "the line is empty"
                continue
            entry, problem = _read(raw)
            yield number, entry, problem

    def last_entry(self) -> dict | None:
        """The last complete entry, read from the end of the file (None if there is none or
        it cannot be read)."""
        if self.folder is None:
            return _read(self._memory[-1].encode())[0] if self._memory else None
        _, _, line = _read_tail(self.path)
        return None if line is None else _read(line)[0]

    def entries(self, since: dt.datetime | None = None) -> Iterator[dict]:
        """The log's readable entries (`scan` says where a line is not one)."""
        for _, entry, _ in self.scan():
            if entry is None:
                continue
            if since is not None and entry_time(entry) < since:
                continue
            yield entry

    def verify(self, anchors: Iterable[Anchor] = ()) -> Verification:
        """Check the chain, the head and every anchor (the hash recorded outside the node for
        an entry must be that entry's hash here). A crash state not yet repaired is reported
        in `pending`, not as tampering."""
        anchored: dict[int, list[Anchor]] = {}
        for anchor in anchors:
            anchored.setdefault(anchor.seq, []).append(anchor)
        prev, seq, count = GENESIS, 0, 0
        last_line: bytes | None = None
        fragment = b""
        repairs: list[str] = []
        damage = ""
        checked = 0

        def failed(problem: str) -> Verification:
            return Verification(False, count, prev, problem, seq, repairs, anchored=checked)

        where = "" if self.path is None else f"{self.path}: "
        for number, raw in enumerate(self._raw_lines(), 1):
            if not raw.endswith(b"\n"):
                fragment = raw  # a torn final line
                break
            if not raw.strip():
                return failed(f"{where}line {number} is empty: the log was edited.")
            entry, problem = _read(raw)
            if entry is None:
                return failed(f"{where}line {number} {problem.removeprefix('the line ')}: the log was edited.")
            if entry["seq"] != seq + 1:
                return failed(
                    f"entry {seq + 1} is missing (line {number} holds entry {entry['seq']}): entries were deleted or reordered."
                )
            if entry["prev"] != prev:
                return failed(
                    f"entry {entry['seq']} does not follow entry {seq}: the chain is broken (an entry was deleted or replaced)."
                )
            if entry_hash(prev, entry) != entry["hash"]:
                return failed(f"entry {entry['seq']} was edited: its hash does not match its content.")
            for anchor in anchored.get(entry["seq"], ()):
                checked += 1
                if anchor.hash != entry["hash"]:
                    return failed(
                        f"entry {entry['seq']} is not the entry that {anchor.source} recorded for study "
                        f"'{anchor.study}' (hash {anchor.hash[:16]}..., here {entry['hash'][:16]}...): the log "
                        "was rewritten after the node released that study's results."
                    )
            if entry.get("kind") == RECOVERY:
                said = "; ".join(str(r.get("sentence", r.get("repair", ""))) for r in entry.get("repairs", []))
                repairs.append(f"entry {entry['seq']}: {said}")
            if entry.get("kind") == DAMAGE and not damage:
                damage = (
                    f"entry {entry['seq']} records that the node found its log damaged when it opened it "
                    f"({entry.get('time', '')[:19]}Z): {entry.get('damage', '')}"
                )
            prev, seq, count = entry["hash"], entry["seq"], count + 1
            last_line = raw
        beyond = [a for s, group in anchored.items() if s > seq for a in group]
        if beyond:
            a = min(beyond, key=lambda a: a.seq)
            return failed(
                f"{a.source} recorded entry {a.seq} for study '{a.study}' but the log ends at entry {seq}: "
                "entries the node released were deleted."
            )
        if damage:
            return failed(damage.rstrip(".") + ".")
        pending = ""
        if self.folder is not None:
            head = self._head_file()
            if head == "invalid":
                return failed("the head file audit.head is not valid: it was edited.")
            state = _classify(head, last_line, fragment)
            if state.damage or state.unreadable:
                return failed((state.damage or state.unreadable) + ".")
            if state.repairs:
                pending = (
                    "; ".join(_found(r) for r in state.repairs)
                    + ". A crash, not an edit: the node repairs it and records a recovery entry when it next starts."
                )
        return Verification(True, count, prev, "", seq, repairs, pending, checked)


@dataclass
class _TailState:
    chain: tuple[int, str] = (0, GENESIS)  # what the next entry chains on
    repairs: list[dict] = field(default_factory=list)
    damage: str = ""
    unreadable: str = ""


def _classify(head, line: bytes | None, fragment: bytes) -> _TailState:
    """What the end of a log says happened: `head` from the head file ((seq, hash), "missing"
    or "invalid"), `line` the last complete line (None: no entry), `fragment` the bytes after
    it."""
    state = _TailState()
    last, problem = _parse(line) if line is not None else (None, "")
    if line is not None and last is None:
        if isinstance(head, tuple):  # chain on from the head; the line stays as evidence
            state.chain = head
            state.damage = f"the log's last complete line {problem.removeprefix('the line ')}"
        else:
            state.unreadable = f"its last complete line {problem.removeprefix('the line ')} and its head file is {head}"
        return state
    if last is not None:
        state.chain = (last["seq"], last["hash"])
        if entry_hash(last["prev"], last) != last["hash"]:
            state.damage = f"entry {last['seq']} was edited: its hash does not match its content"
    seq, last_hash = state.chain
    if fragment:
        state.repairs.append(
            {
                "repair": "torn_tail",
                "after_seq": seq,
                "bytes": len(fragment),
                "sha256": hashlib.sha256(fragment).hexdigest(),
                "sentence": f"removed a torn final line of {len(fragment)} bytes after entry {seq} (the node "
                "stopped while writing it, before anything it recorded was sent)",
            }
        )
    if head == "missing" and seq <= 1:
        head = (0, GENESIS)  # the first append stopped before the head file was created
    if head == "missing":
        state.damage = state.damage or (
            f"the head file audit.head is missing although the log holds {seq} entries, so deletions at "
            "the end cannot be ruled out"
        )
    elif head == "invalid":
        state.damage = state.damage or "the head file audit.head is not valid: it was edited"
    elif head == (seq, last_hash):
        pass
    elif last is not None and head[0] == seq - 1 and head[1] == last["prev"] and not state.damage:
        state.repairs.append(
            {
                "repair": "head_rolled_forward",
                "seq": seq,
                "sentence": f"entry {seq} was written in full but the head still recorded entry {seq - 1} "
                "(the node stopped before confirming it, so its reply was not sent); the head now records it",
            }
        )
    elif head[0] == seq + 1 and fragment:
        state.repairs.append(
            {
                "repair": "lost_entry",
                "seq": head[0],
                "hash": head[1],
                "sentence": f"the head recorded entry {head[0]} (hash {head[1][:16]}...) but the crash lost the "
                "end of its line: what that entry recorded cannot be recovered",
            }
        )
    elif head[0] > seq:
        state.damage = state.damage or (
            f"the log ends at entry {seq} but the head records entry {head[0]}: the last entries were deleted"
        )
    else:
        state.damage = state.damage or (
            f"the head file records entry {head[0]} but the log ends at entry {seq}: the head does not match "
            "the last entry (the log or its head was edited)"
        )
    return state


def _found(repair: dict) -> str:
    """A crash state not yet repaired, in words."""
    if repair["repair"] == "torn_tail":
        return (
            f"the last line ({repair['bytes']} bytes after entry {repair['after_seq']}) is torn: the node "
            "stopped while writing it"
        )
    if repair["repair"] == "head_rolled_forward":
        return (
            f"entry {repair['seq']} is written in full but the head still records entry {repair['seq'] - 1}: "
            "the node stopped before confirming it"
        )
    return f"the head records entry {repair['seq']} but the crash tore that entry's line"


def _read(raw: bytes) -> tuple[dict | None, str]:
    """A line as an entry every reader can rely on (`_parse`, then `entry_problem`), or None
    and what is wrong with it."""
    entry, problem = _parse(raw)
    if entry is not None:
        wrong = entry_problem(entry)
        if wrong:
            return None, f"the line is not a valid entry ({wrong})"
    return entry, problem


# The fields the node writes, each optional (an entry holds those of its kind), and the type
# each must have when present.
_TEXT_FIELDS = ("time", "node", "task_id", "kind", "study_hash", "params", "status", "code", "error", "damage")
_OBJECT_LISTS = ("repairs", "refusal")


def entry_problem(entry: dict) -> str:
    """What is wrong with the fields of an entry that has its chain fields (`_parse`), in a few
    words, or "" if nothing: a field the node writes as text that is not text, a round that is
    not a whole number, repairs or refusals that are not a list of objects, or a released
    array that does not hold the numbers its shape says. Every reader of the log (the
    listing, `verify`, `last_entry`, the node's status) reads only entries this accepts, so
    such an entry is reported as a damaged line, never raised on."""
    for name in _TEXT_FIELDS:
        if name in entry and not isinstance(entry[name], str):
            return f"field '{name}' is not text"
    if "round" in entry and not _whole(entry["round"]):
        return "field 'round' is not a whole number"
    for name in _OBJECT_LISTS:
        items = entry.get(name, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            return f"field '{name}' is not a list of objects"
    if "released" not in entry:
        return ""
    released = entry["released"]
    if not isinstance(released, dict):
        return "field 'released' is not an object"
    arrays = released.get("arrays", {})
    if not isinstance(arrays, dict):
        return "field 'released.arrays' is not an object"
    for name, logged in arrays.items():
        problem = _array_problem(logged)
        if problem:
            shown = "".join(ch for ch in name[:60] if ch.isprintable())
            return f"released array '{shown}' {problem}"
    return ""


def _array_problem(logged) -> str:
    """What is wrong with a released array as the log holds it (`arrays_for_log`, or the
    "values" list of release 0.2.0), or ""."""
    if not isinstance(logged, dict):
        return "is not an object"
    shape = logged.get("shape")
    if not isinstance(shape, list) or not all(_whole(n) and n >= 0 for n in shape):
        return "has a shape that is not a list of sizes"
    size = math.prod(shape)
    if "f8_base64" in logged:
        # Its length, not its characters (decoding every array would slow `verify` by a
        # third); `logged_array` decodes it strictly.
        text = logged["f8_base64"]
        if not isinstance(text, str) or not text.isascii() or len(text) % 4:
            return "has values that are not base64 text"
        pad = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
        if len(text) // 4 * 3 - pad != 8 * size:
            return "does not hold the numbers its shape says"
        return ""
    if "values" in logged:
        values = logged["values"]
        if not isinstance(values, list) or not all(_number(v) for v in values):
            return "has values that are not a list of numbers"
        if len(values) != size:
            return "does not hold the numbers its shape says"
        return ""
    return "has no values"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(raw: bytes) -> tuple[dict | None, str]:
    """An entry with its chain fields (seq, prev, hash), or None: all that continuing the
    chain needs (`_classify`); readers use `_read`, which checks the other fields too."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "the line is not a valid entry"
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("seq"), int)
        or isinstance(entry.get("seq"), bool)
        or not isinstance(entry.get("hash"), str)
        or not isinstance(entry.get("prev"), str)
    ):
        return None, "the line is not a valid entry"
    return entry, ""


def _read_tail(path: Path) -> tuple[int, bytes, bytes | None]:
    """(bytes up to and including the last newline, the bytes after it, the last complete line
    without its newline or None)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return 0, b"", None
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        buf = b""
        while True:
            last = buf.rfind(b"\n")
            if last >= 0 and (buf.rfind(b"\n", 0, last) >= 0 or pos == 0):
                break
            if pos == 0:
                break
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
        if last < 0:
            return 0, buf, None
        start = buf.rfind(b"\n", 0, last) + 1
        return pos + last + 1, buf[last + 1 :], buf[start:last]


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_anchors(paths: Iterable[str | Path], node: str) -> list[Anchor]:
    """The audit heads that results files recorded for `node` (each study's `nodes` entries,
    nested models included). SpecError for a file that is not a results file."""
    out: list[Anchor] = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: no such results file.") from None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            raise SpecError(f"{path}: not a results file (expected the JSON that 'iaptnet run' writes).") from None
        stack = [(data, "")]
        while stack:
            item, study = stack.pop()
            if isinstance(item, list):
                stack.extend((x, study) for x in item)
                continue
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("study_hash"), str) and isinstance(item.get("study"), str):
                study = item["study"]
            head = item.get("audit_head")
            if item.get("name") == node and isinstance(head, dict):
                seq, hash_ = head.get("seq"), head.get("hash")
                if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 and isinstance(hash_, str):
                    out.append(Anchor(str(path), study or path.parent.name, seq, hash_))
            stack.extend((v, study) for v in item.values() if isinstance(v, (dict, list)))
    return sorted(set(out), key=lambda a: (a.seq, a.source, a.study))


def entry_time(entry: dict) -> dt.datetime:
    """When an entry was written (the earliest time for an entry without a readable one)."""
    return _parse_time(str(entry.get("time", "")))


def _parse_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)


def parse_since(text: str) -> dt.datetime:
    """A --since value: YYYY-MM-DD or an ISO time, read as UTC."""
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(f"--since {text!r}: expected a date YYYY-MM-DD or a time YYYY-MM-DDTHH:MM.") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --------------------------------------------------------------------------- the node's memory


class NodeMemory:
    """Task ids answered, tasks per study today, studies today, and released row sets."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.RLock()
        self._state = {"day": "", "studies": {}, "tasks": {}}
        self._releases = ReleaseMemory(folder)
        self._conditions = ReleaseMemory(folder, "conditions")
        self._span = SpanMemory(folder)
        self._thresholds: dict[str, ReleaseMemory] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def transaction(self):
        """Hold the memory (across threads and processes), load it, and save it afterwards."""
        with self._lock, _file_lock(self.folder / "memory.lock") if self.folder else contextlib.nullcontext():
            if self.folder is not None:
                try:
                    self._state = json.loads((self.folder / "memory.json").read_text())
                except FileNotFoundError:
                    pass
                except ValueError:
                    raise DataError(
                        "the node's memory file is damaged; its operator must restore it "
                        "from backup (deleting it forgets which tasks were answered)."
                    ) from None
            before = json.dumps(self._state, sort_keys=True)
            yield self
            after = json.dumps(self._state, sort_keys=True)
            if self.folder is not None and after != before:  # (an audit alone changes nothing)
                _write_atomic(self.folder / "memory.json", after)

    # -- replay
    def seen_task(self, task_id: str) -> bool:
        return task_id in self._state["tasks"]

    def remember_task(self, task_id: str, issued_at: float, now: float, max_age: float) -> None:
        tasks = self._state["tasks"]
        for old in [k for k, t in tasks.items() if t < now - 2 * max_age]:
            del tasks[old]  # older tasks are refused for their age anyway
        tasks[task_id] = issued_at

    # -- volume
    def _roll(self, now: float) -> None:
        day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
        if self._state.get("day") != day:
            self._state["day"] = day
            self._state["studies"] = {}
            self._state["refused"] = 0
            self._state["answered"] = {}

    def tasks_today(self, study_hash: str, now: float) -> int:
        self._roll(now)
        return int(self._state["studies"].get(study_hash, 0))

    def answered_before(self, key: str, now: float) -> bool:
        self._roll(now)
        return key in self._state.get("answered", {})

    def remember_answer(self, key: str, now: float) -> None:
        self._roll(now)
        answered = self._state.setdefault("answered", {})
        if len(answered) < 200_000:
            answered[key] = 1

    def refusals_today(self, now: float) -> int:
        self._roll(now)
        return int(self._state.get("refused", 0))

    def count_refusal(self, now: float) -> None:
        self._roll(now)
        self._state["refused"] = int(self._state.get("refused", 0)) + 1

    def studies_today(self, now: float) -> int:
        self._roll(now)
        return len(self._state["studies"])

    def count_task(self, study_hash: str, now: float) -> None:
        self._roll(now)
        self._state["studies"][study_hash] = self._state["studies"].get(study_hash, 0) + 1

    # -- thresholds of quantile bisections, per variable (node/describe.py)
    def thresholds(self, variable: str, version: str, n: int):
        """Every threshold row set released on one variable, with the rows of the column it
        was counted in, from any table study on this data version: the sets whose combinations
        a new threshold is judged with when other studies have bisected the same variable."""
        name = "thresholds/" + hashlib.sha256(variable.encode()).hexdigest()[:16]
        if name not in self._thresholds:
            self._thresholds[name] = ReleaseMemory(self.folder, name)
        return self._thresholds[name].for_version(version, n)

    def threshold_studies(self, variable: str, version: str) -> set[str]:
        """The studies that released thresholds on this variable on this data version."""
        return set(self._state.get("thresholds", {}).get(f"{version[:32]}:{variable}", []))

    def add_threshold_study(self, variable: str, version: str, study_hash: str) -> None:
        studies = self._state.setdefault("thresholds", {}).setdefault(f"{version[:32]}:{variable}", [])
        if study_hash not in studies:
            studies.append(study_hash)

    # -- what was released (the differencing audit, node/release_memory.py)
    def releases(self, version: str, n: int):
        """The memory of everything released on this data version (n rows)."""
        return self._releases.for_version(version, n)

    def audit_release(self, footprints, version: str, n: int, rules: Rules, vetted=()) -> list[Violation]:
        """Violations of the subset rule, generalised: would releasing these footprints let
        some combination of everything released on this data version single out 1 to
        min_subset_difference - 1 people? (`vetted`: footprints of this release already
        audited together, see VersionMemory.audit.)"""
        t = rules.min_subset_difference
        out = []
        for finding in self.releases(version, n).audit(footprints, t, vetted=list(vetted)):
            out.append(
                Violation(
                    "min_subset_difference",
                    _FINDINGS[finding.what].format(t=t),
                    t,
                    model=finding.label,
                    fix=_FIXES[finding.what],
                )
            )
        return out

    def remember_release(self, footprints, version: str, n: int, rules: Rules, span=None) -> None:
        """Remember a release's footprints (the differencing audit) and join those in `span`
        (default: all) to the span of released columns (node/span.py)."""
        self.releases(version, n).remember(footprints, rules.min_subset_difference)
        self._span.for_version(version, n).remember(footprints if span is None else span)

    def span_lifted(self, footprints, version: str, n: int):
        """(rows, leverages) of the rows whose leverage in the span of released columns would
        change with these footprints' columns (None: they add nothing; node/span.py)."""
        return self._span.for_version(version, n).lifted(footprints)

    def audit_span(self, footprints, version: str, n: int, rules: Rules) -> list[Violation]:
        """The leverage rule over everything released on this data version with these
        footprints (node/span.py): no combination of all the released columns may weigh one
        row more than max_leverage."""
        if rules.max_combined_leverage >= 1.0 or not footprints:
            return []
        top = self._span.for_version(version, n).audit(footprints)
        if top <= rules.max_combined_leverage:
            return []
        return [
            Violation(
                "max_combined_leverage",
                "together with everything this node released before on this data, the "
                "statistics would let a combination of results across models, studies or tables single "
                "out one person's row (its leverage in all the released columns is above the limit)",
                rules.max_combined_leverage,
                fix="use the covariates and cohorts of earlier studies; the Trust can start a new data version",
            )
        ]

    # -- the coefficients of GLM rounds answered (the probing defence compares with them)
    def answered_rounds(self, study_hash: str, version: str) -> dict[str, list[np.ndarray]]:
        """Every coefficient vector answered for this study on this data version, by model:
        kept on disk, so a restarted node compares a new round with rounds answered before
        the restart, not only since."""
        path = self._rounds_path(study_hash, version)
        if path is None or not path.exists():
            return {}
        out: dict[str, list[np.ndarray]] = {}
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():  # (a torn last line: not yet written)
            try:
                entry = json.loads(line)
                beta = np.array([float(v) for v in entry["beta"]], dtype=float)
                out.setdefault(str(entry["model"]), []).append(beta)
            except (ValueError, KeyError, TypeError):
                raise MemoryDamaged(
                    f"this node's record of answered rounds ({path}) has an entry it cannot "
                    "read; restore the state folder from its backup before answering more "
                    "tasks"
                ) from None
        return out

    def remember_rounds(self, study_hash: str, version: str, betas: dict[str, np.ndarray]) -> None:
        path = self._rounds_path(study_hash, version)
        if path is None or not betas:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(
            json.dumps({"model": key, "beta": [float(v) for v in np.asarray(beta, dtype=float)]}) + "\n"
            for key, beta in betas.items()
        )
        with self._lock, open(path, "a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def _rounds_path(self, study_hash: str, version: str) -> Path | None:
        if self.folder is None:
            return None
        name = hashlib.sha256(study_hash.encode()).hexdigest()[:32]
        return self.folder / "rounds" / version[:32] / f"{name}.jsonl"

    # -- the conditions of cohort filters answered (node/cohort.py)
    def audit_conditions(self, conditions, version: str, n: int, rules: Rules) -> list[Violation]:
        """Violations by a filter's conditions: the rows of the whole dataset that one column's
        conditions admit may not differ by 1 to min_subset_difference - 1 people from no one,
        from everyone, or from the rows admitted by a condition answered before. The sets
        depend on that one column only, so neither the answer nor the refusal can tell
        anything about the values of another column (the cohort's, which the release audit
        judges): filters `age < 93` and `age < 94` are refused together whoever is 93."""
        t = rules.min_subset_difference
        if t <= 1 or not conditions:
            return []
        footprints = _condition_footprints(conditions)
        few = [fp for fp in footprints if 0 < int(np.count_nonzero(fp.rows)) < t]
        if few:
            return [
                Violation(
                    "min_subset_difference",
                    _CONDITION_FINDING.format(t=t, label=few[0].label),
                    t,
                    fix="widen or drop that condition, or use the conditions of earlier studies",
                )
            ]
        out = []
        for finding in self._conditions.for_version(version, n).audit(footprints, t):
            out.append(
                Violation(
                    "min_subset_difference",
                    _CONDITION_FINDING.format(t=t, label=finding.label),
                    t,
                    fix="widen or drop that condition, or use the conditions of earlier studies",
                )
            )
        return out

    def remember_conditions(self, conditions, version: str, n: int, rules: Rules) -> None:
        if conditions:
            self._conditions.for_version(version, n).remember(
                _condition_footprints(conditions), rules.min_subset_difference
            )


def _condition_footprints(conditions) -> list:
    """One set per distinct (column, rows admitted), compared in pairs only."""
    out, seen = [], set()
    for column, rows in conditions:
        key = (column, hashlib.sha256(np.packbits(rows).tobytes()).hexdigest())
        if key not in seen:
            seen.add(key)
            out.append(Footprint(f"the filter's condition on '{column}'", rows, combine=False))
    return out


_CONDITION_FINDING = (
    "{label} admits rows of this node's whole dataset that differ by fewer than {t} "
    "people from no one, from everyone, or from the rows a condition of an earlier "
    "filter admitted (results on such filters could differ by those few people)"
)


_FINDINGS = {
    "complement": "the rows used leave out fewer than {t} of this node's rows, so the result would differ "
    "from the whole dataset's by a few people",
    "rows": "the rows used differ from rows this node already released results on by fewer than {t} people "
    "(a differencing attack, or a covariate missing for a few)",
    "combination": "together with row sets this node already released results on, the rows used would let a "
    "combination of the results single out fewer than {t} people (a differencing attack)",
    "column": "a column of this release (a term, offset or variable) equals one this node already released "
    "except for fewer than {t} people (a differencing attack)",
    "unproved": "the node cannot prove that this release, with what it released before, does not single out "
    "fewer than {t} people",
}
_FIXES = {
    "complement": "use the whole dataset, or a cohort that leaves out more people",
    "rows": "use the same cohort and covariates as before, or ones that differ by more people",
    "combination": "use the same cohorts as earlier studies, or cohorts that differ from them by more people",
    "column": "use the same terms as earlier studies, or terms that differ from them for more people",
    "unproved": "use cohorts and terms closer to earlier studies; the Trust can start a new data version",
}
