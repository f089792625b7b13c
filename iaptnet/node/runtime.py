"""A node's long-lived state: its configuration, its dataset and the studies it has prepared.

One `NodeRuntime` per node. In the in-process engine several live in one process, keyed by
node name; in a deployed node daemon there is one. Prepared design matrices are kept per
study so that each round only multiplies matrices.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import DataError

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

    @classmethod
    def from_mapping(cls, m) -> "NodeConfig":
        def opt(key):
            value = m.get(key)
            return str(value) if value not in (None, "") else None
        return cls(name=str(m["name"]), data=str(m["data"]), schema=opt("schema"),
                   policy=opt("policy"), table=opt("table"), query=opt("query"))


@dataclass
class PreparedStudy:
    designs: dict
    families: dict
    rounds: int = 0


class NodeRuntime:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.name = config.name
        self._dataset = None
        self._lock = threading.Lock()
        self.prepared: OrderedDict[str, PreparedStudy] = OrderedDict()

    @property
    def dataset(self):
        """The node's dataset, loaded and validated on first use."""
        with self._lock:
            if self._dataset is None:
                from .dataset import load_dataset

                source = self.config.data
                self._dataset = load_dataset(source, self.config.schema, table=self.config.table,
                                             query=self.config.query)
                log.info("node %s loaded %s rows (data version %s)", self.name,
                         self._dataset.n_rows, self._dataset.data_version[:12])
            if not self._dataset.usable:
                raise DataError("this node's data does not pass validation; its operator can run 'iaptnet node check' to see why.")
            return self._dataset

    def remember(self, study_hash: str, prepared: PreparedStudy) -> None:
        self.prepared[study_hash] = prepared
        self.prepared.move_to_end(study_hash)
        while len(self.prepared) > MAX_PREPARED:
            self.prepared.popitem(last=False)

    def recall(self, study_hash: str) -> PreparedStudy:
        try:
            prepared = self.prepared[study_hash]
        except KeyError:
            raise DataError("this node has not prepared the study (it may have restarted); start the study again.") from None
        self.prepared.move_to_end(study_hash)
        return prepared


_RUNTIMES: dict[NodeConfig, NodeRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()


def runtime_for(config: NodeConfig) -> NodeRuntime:
    with _RUNTIMES_LOCK:
        if config not in _RUNTIMES:
            _RUNTIMES[config] = NodeRuntime(config)
        return _RUNTIMES[config]


def resolve_path(base: Path, value: str) -> str:
    """A data or schema path relative to the file that names it (URLs pass through)."""
    if "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else (base / path))
