"""A node's long-lived state: its configuration, its dataset, its policy, audit log and
memory, and the studies it has prepared.

One `NodeRuntime` per node. In the in-process engine several live in one process, keyed by
node name; in a deployed node daemon there is one. Prepared design matrices are kept per
study so that each round only multiplies matrices. The audit log and memory live in the
policy's `state_dir`, in a folder per node name; a node without a policy file keeps them on
disk too (`state_folder`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import DataError
from ..protocol.formula_check import log_exception

log = logging.getLogger("iaptnet.node")

MAX_PREPARED = 8


@dataclass(frozen=True)
class NodeConfig:
    """What a node needs to serve: its name, data source, optional schema and policy."""

    name: str
    data: str
    schema: str | None = None
    policy: str | None = None
    table: str | None = None  # for an SQL source: the table (or `query`)
    query: str | None = None
    # The IAPT extract's appointment table (node/iapt/appointments.py): a path or a URL with
    # appointments_table or appointments_query.
    appointments: str | None = None
    appointments_table: str | None = None
    appointments_query: str | None = None
    # Where a node without a policy file keeps its audit log and release memory (the
    # network file's `.iaptnet-state` folder, or the daemon's state_dir); see `state_folder`.
    state: str | None = None
    # The ODS codes of the services whose referrals this node holds, comma-separated (the
    # network file's or node.toml's `services`): its data may hold no other service_id.
    services: str | None = None

    @classmethod
    def from_mapping(cls, m) -> NodeConfig:
        def opt(key):
            value = m.get(key)
            return str(value) if value not in (None, "") else None

        return cls(
            name=str(m["name"]),
            data=str(m["data"]),
            schema=opt("schema"),
            policy=opt("policy"),
            table=opt("table"),
            query=opt("query"),
            appointments=opt("appointments"),
            appointments_table=opt("appointments_table"),
            appointments_query=opt("appointments_query"),
            state=opt("state"),
            services=_services_text(m.get("services")),
        )

    @property
    def service_codes(self) -> tuple[str, ...] | None:
        """The declared service codes, or None when the node declares none."""
        return tuple(self.services.split(",")) if self.services else None

    def appointment_source(self):
        from .dataset import AppointmentSource

        if self.appointments is None:
            return None
        return AppointmentSource(self.appointments, self.appointments_table, self.appointments_query)


def _services_text(value) -> str | None:
    """Declared services as one comma-separated string (a list is accepted too)."""
    if value in (None, "", [], ()):
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class PreparedStudy:
    designs: dict
    families: dict
    cov_types: dict = field(default_factory=dict)  # model key -> "nonrobust" | "HC0" | "cluster"
    rounds: int = 0
    facts: dict = field(default_factory=dict)  # model key -> disclosure.ModelFacts
    history: dict = field(default_factory=dict)  # model key -> [coefficient vectors answered]
    weight_cache: dict = field(default_factory=dict)  # model key -> [{weight name: vector}], aligned with history
    approved: bool = False
    declined: set = field(default_factory=set)  # optional models this node declined (too few rows)


class NodeRuntime:
    def __init__(self, config: NodeConfig, policy=None):
        self.config = config
        self.name = config.name
        self._dataset = None
        self._lock = threading.Lock()
        self.prepared: OrderedDict[str, PreparedStudy] = OrderedDict()
        # Columns computed for a study by an earlier step of it (e.g. matched pairs), keyed by
        # state key, aligned with the dataset's rows; never sent anywhere.
        self.augments: OrderedDict[str, object] = OrderedDict()
        self._policy = policy
        self._policy_stamp = None  # (mtime_ns, size) of the policy file last read
        self._fixed_policy = policy is not None
        self._state = None
        self._state_dir = None
        self.approvals: dict[str, bool] = {}  # study hash -> approved by the Trust (vs exploratory)
        self.task_lock = threading.RLock()  # one task at a time per node

    @property
    def policy(self):
        """The node's policy: read on first use and again whenever its file changes (so an
        `iaptnet node approve` takes effect without a restart). A local node without a file
        is exploratory. A file that became invalid raises SpecError: the node then refuses
        every task until it is fixed."""
        if self._fixed_policy:
            return self._policy
        from .policy import load_policy

        stamp = None
        if self.config.policy:
            try:
                st = Path(self.config.policy).stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = ("missing",)
        if self._policy is None or stamp != self._policy_stamp:
            policy = load_policy(self.config.policy, production=False)  # SpecError: keep failing
            if self._state is not None and policy.state_dir != self._state_dir:
                self._state = None
            self._policy, self._policy_stamp = policy, stamp
        return self._policy

    @property
    def state(self):
        """(audit log, memory) of this node, shared by every runtime serving the same folder."""
        policy = self.policy
        if self._state is None:
            self._state = _state_for((state_folder(self.config, policy.state_dir) / self.name).resolve())
            self._state_dir = policy.state_dir
        return self._state

    @property
    def audit(self):
        return self.state[0]

    @property
    def memory(self):
        return self.state[1]

    @property
    def dataset(self):
        """The node's dataset, loaded and validated on first use."""
        with self._lock:
            if self._dataset is None:
                from .dataset import load_dataset

                source = self.config.data
                self._dataset = load_dataset(
                    source,
                    self.config.schema,
                    table=self.config.table,
                    query=self.config.query,
                    appointments=self.config.appointment_source(),
                    services=self.config.service_codes,
                )
                log.info(
                    "node %s loaded %s rows (data version %s)",
                    self.name,
                    self._dataset.n_rows,
                    self._dataset.data_version[:12],
                )
            if not self._dataset.usable:
                raise DataError(self._dataset.unusable_reason())
            return self._dataset

    def remember(self, study_hash: str, prepared: PreparedStudy) -> None:
        self.prepared[study_hash] = prepared
        self.prepared.move_to_end(study_hash)
        while len(self.prepared) > MAX_PREPARED:
            self.prepared.popitem(last=False)

    def remember_columns(self, key: str, frame) -> None:
        """Keep columns computed for a study (a DataFrame aligned with the dataset's rows)."""
        self.augments[key] = frame
        self.augments.move_to_end(key)
        while len(self.augments) > MAX_PREPARED:
            self.augments.popitem(last=False)

    def recall(self, study_hash: str) -> PreparedStudy:
        try:
            prepared = self.prepared[study_hash]
        except KeyError:
            raise DataError(
                "this node has not prepared the study (it may have restarted); start the study again."
            ) from None
        self.prepared.move_to_end(study_hash)
        return prepared


def state_folder(config: NodeConfig, policy_state_dir) -> Path:
    """Where the node keeps what it must never forget (its audit log and the memory of what it
    released): on disk always, so that two runs differing by one person are compared even
    when nobody wrote a policy file. In order: the policy file's `state_dir`; the
    IAPTNET_STATE_DIR environment variable; the folder the network file or node.toml names
    (`.iaptnet-state` beside a network file); the user's state directory
    ($XDG_STATE_HOME/iaptnet, by default ~/.local/state/iaptnet), under a folder per data
    source."""
    if policy_state_dir is not None:
        return Path(policy_state_dir)
    env = os.environ.get("IAPTNET_STATE_DIR")
    if env:
        return Path(env)
    if config.state:
        return Path(config.state)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "iaptnet"
    source = hashlib.sha256(f"{config.data}|{config.table}|{config.query}".encode()).hexdigest()[:16]
    return base / source


_RUNTIMES: dict[NodeConfig, NodeRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()
_STATES: dict = {}


def _state_for(folder: Path):
    from .audit import AuditLog, NodeMemory

    with _RUNTIMES_LOCK:
        if folder not in _STATES:
            audit = AuditLog(folder)
            try:
                # Opening the log repairs what a crash left (a torn line, a lagging head) and
                # records it; a log that cannot be continued fails every append instead
                # (the node then releases nothing), so it is not fatal here.
                audit.recover()
            except Exception:  # noqa: BLE001
                log_exception(log, "node state %s: the audit log could not be opened", folder)
            _STATES[folder] = (audit, NodeMemory(folder))
        return _STATES[folder]


def runtime_for(config: NodeConfig) -> NodeRuntime:
    with _RUNTIMES_LOCK:
        if config not in _RUNTIMES:
            _RUNTIMES[config] = NodeRuntime(config)
        return _RUNTIMES[config]
