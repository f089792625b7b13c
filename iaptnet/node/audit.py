"""The node's audit log and its memory, kept in the policy's `state_dir` (per node name).

`audit.jsonl` is append-only and hash-chained: one JSON line per task with the time, the
task's id, kind, study hash and round, a digest of its parameters, its status, and exactly
what was released (every payload value and every array element, as sent) or the refusal or
error; `prev` is the previous entry's hash and `hash` = sha256(prev + canonical JSON of the
entry without `hash`). `audit.head` holds the last sequence number and hash, so deleting
entries from the end is detected as well as editing or deleting any entry. `iaptnet node
audit --verify` checks both.

The memory (`memory.json`, `rowsets/`) is what the node must remember between tasks: task
ids it has answered (replay), tasks per study and studies today (volume limits), and a
bitmap of every row set it has released model statistics on (the subset rule). Without a
state folder (a local network's node with no policy file) all of it lives in memory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..protocol.errors import DataError, SpecError
from .disclosure import Violation
from .policy import Rules
from .release_memory import Footprint, MemoryDamaged, ReleaseMemory
from .span import SpanMemory

GENESIS = "0" * 64

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
    return {
        name: {"shape": list(np.shape(a)), "values": np.asarray(a, dtype=float).ravel().tolist()}
        for name, a in sorted(arrays.items())
    }


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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
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


@dataclass
class Verification:
    ok: bool
    entries: int
    head: str
    problem: str = ""


class AuditLog:
    """Append-only, hash-chained. `folder=None` keeps the entries in memory."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._memory: list[str] = []
        self._memory_head: tuple[int, str] = (0, GENESIS)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / "audit.jsonl"

    @property
    def head_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "audit.head"

    def append(self, fields: dict) -> dict:
        """Chain and write one entry; returns it (with seq, prev and hash)."""
        with self._lock, _file_lock(self.folder / "audit.lock") if self.folder else contextlib.nullcontext():
            seq, prev = self._head()
            entry = {"seq": seq + 1, **fields, "prev": prev}
            # The body is serialised once: hashed, then written with the hash appended (the
            # line is the canonical body plus its hash; verify() re-serialises the body).
            body = canonical(entry)
            entry["hash"] = hashlib.sha256((prev + body).encode()).hexdigest()
            line = body[:-1] + ',"hash":' + json.dumps(entry["hash"]) + "}\n"
            if self.folder is None:
                self._memory.append(line)
                self._memory_head = (entry["seq"], entry["hash"])
            else:
                with open(self.path, "a") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
                _write_atomic(self.head_path, json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n")
            return entry

    def _head(self) -> tuple[int, str]:
        if self.folder is None:
            return self._memory_head
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["hash"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            last = _last_line(self.path)
            if last is None:
                return 0, GENESIS
            entry = json.loads(last)
            return int(entry["seq"]), str(entry["hash"])

    def lines(self) -> Iterator[str]:
        if self.folder is None:
            yield from list(self._memory)
            return
        if not self.path.exists():
            return
        with open(self.path) as fh:
            yield from fh

    def entries(self, since: dt.datetime | None = None) -> Iterator[dict]:
        for line in self.lines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if since is not None and _parse_time(entry.get("time", "")) < since:
                continue
            yield entry

    def verify(self) -> Verification:
        prev, seq, count = GENESIS, 0, 0
        for number, line in enumerate(self.lines(), 1):
            if not line.strip():
                return Verification(False, count, prev, f"line {number} is empty: the log was edited.")
            try:
                entry = json.loads(line)
            except ValueError:
                return Verification(False, count, prev, f"line {number} is not a valid entry: the log was edited.")
            if not isinstance(entry, dict) or "hash" not in entry or "seq" not in entry:
                return Verification(False, count, prev, f"line {number} is not a valid entry: the log was edited.")
            if entry["seq"] != seq + 1:
                return Verification(
                    False,
                    count,
                    prev,
                    f"entry {seq + 1} is missing (line {number} holds entry {entry['seq']}): entries were deleted or reordered.",
                )
            if entry.get("prev") != prev:
                return Verification(
                    False,
                    count,
                    prev,
                    f"entry {entry['seq']} does not follow entry {seq}: the chain is broken (an entry was deleted or replaced).",
                )
            if entry_hash(prev, entry) != entry["hash"]:
                return Verification(
                    False, count, prev, f"entry {entry['seq']} was edited: its hash does not match its content."
                )
            prev, seq, count = entry["hash"], entry["seq"], count + 1
        if self.folder is not None:
            try:
                head = json.loads(self.head_path.read_text())
            except FileNotFoundError:
                if count:
                    return Verification(
                        False,
                        count,
                        prev,
                        "the head file audit.head is missing, so deletions at the end cannot be ruled out.",
                    )
                head = {"seq": 0, "hash": GENESIS}
            except ValueError:
                return Verification(False, count, prev, "the head file audit.head is not valid: it was edited.")
            if head.get("seq") != seq or head.get("hash") != prev:
                if isinstance(head.get("seq"), int) and head["seq"] > seq:
                    return Verification(
                        False,
                        count,
                        prev,
                        f"the log ends at entry {seq} but the head records entry {head['seq']}: the last entries were deleted.",
                    )
                return Verification(
                    False, count, prev, "the head file does not match the last entry: the log or its head was edited."
                )
        return Verification(True, count, prev)


def _last_line(path: Path) -> str | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        pos, chunk, data = end, 65536, b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            stripped = data.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1].decode()
        return data.rstrip(b"\n").decode() or None


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
