"""Helpers for governance tests: one node behind the real Flower ClientApp, driven by a test
that plays the coordinator (honest or not): it sends any task and reads the raw reply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Message, RecordDict
from glmcase import write_schema

from iaptnet.coordinator.engines.inprocess import InProcessGrid
from iaptnet.node.runtime import NodeConfig, runtime_for
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.kinds import glm as glm_protocol
from iaptnet.protocol.kinds.glm import batch_hash
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import StudySpec, parse_study

REFUSAL_KEYS = {"rule", "sentence", "threshold", "model", "term", "level", "fix"}


class Node:
    def __init__(
        self, folder: Path, frame: pd.DataFrame, columns: dict, policy: str | None = None, name: str = "trust"
    ):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        schema_path = write_schema(folder / "schema.toml", columns)
        frame.to_csv(folder / f"{name}.csv", index=False)
        self.config = {"name": name, "data": str(folder / f"{name}.csv"), "schema": str(schema_path)}
        if policy is not None:
            (folder / "policy.toml").write_text(policy)
            self.config["policy"] = str(folder / "policy.toml")
        self.schema = Schema.load(schema_path)
        self.grid = InProcessGrid([self.config])

    @property
    def runtime(self):
        return runtime_for(NodeConfig.from_mapping(self.config))

    def spec(self, **fields) -> dict:
        """A study validated as the coordinator would, in wire form."""
        fields.setdefault("name", "s")
        fields.setdefault("family", "binomial")
        spec, _ = parse_study(fields, self.schema, "study.toml")
        return spec.to_wire()

    @staticmethod
    def hash_of(*wires: dict) -> str:
        return batch_hash([StudySpec.from_wire(w).hash for w in wires])

    def send(self, task: m.Task) -> m.Reply:
        return self.send_content(m.encode_task(task))

    def send_content(self, content: RecordDict) -> m.Reply:
        msg = Message(content, 1, m.MESSAGE_TYPE, group_id="attack")
        (reply,) = self.grid.send_and_receive([msg])
        assert not reply.has_error(), "the node's app raised: Flower would forward its text"
        return m.decode_reply(reply.content)

    def prepare(
        self, *wires: dict, study_hash: str | None = None, kind: str = glm_protocol.PREPARE
    ) -> tuple[m.Reply, str]:
        models = {f"m{i}": w for i, w in enumerate(wires)}
        study_hash = study_hash or self.hash_of(*wires)
        task = m.Task(kind=kind, study_hash=study_hash, payload={"models": models, "transform_state": {}})
        return self.send(task), study_hash

    def round(self, study_hash: str, betas: dict[str, np.ndarray], meat: list[str] | None = None) -> m.Reply:
        """A glm.round at `betas`; `meat`: the models whose robust middle term it asks for."""
        arrays = {f"beta/{k}": np.asarray(v, dtype=float) for k, v in betas.items()}
        payload = {"models": list(betas)} | ({"meat": meat} if meat is not None else {})
        return self.send(m.Task(kind=glm_protocol.ROUND, study_hash=study_hash, payload=payload, arrays=arrays))

    def audit_entries(self) -> list[dict]:
        return list(self.runtime.audit.entries())


class ApprovingNode(Node):
    """A node in approved mode whose Trust approves every study before it is sent: the worst
    case of approval, a reviewer who approves each study because it looks harmless alone."""

    def __init__(self, folder: Path, frame: pd.DataFrame, columns: dict, name: str = "trust"):
        self.approved: list[str] = []
        super().__init__(folder, frame, columns, policy=self._policy_text(), name=name)

    def _policy_text(self) -> str:
        return 'mode = "approved"\napproved = [' + ", ".join(f'"{h}"' for h in self.approved) + "]\n"

    def send(self, task: m.Task) -> m.Reply:
        models = task.payload.get("models") if isinstance(task.payload, dict) else None
        wires = models.values() if isinstance(models, dict) else []
        hashes = []
        for wire in wires:
            try:
                hashes.append(StudySpec.from_wire(wire).hash)
            except SpecError:  # no study to review: nothing to approve
                pass
        new = [h for h in hashes if h not in self.approved]
        if new:
            self.approved += new
            (self.folder / "policy.toml").write_text(self._policy_text())
        return super().send(task)


def local_beta(reply: m.Reply, key: str = "m0") -> np.ndarray:
    """The node's own estimate, as any coordinator can compute it from a prepare reply."""
    ibeta = reply.arrays[f"local_ibeta/{key}"]
    info = m.unpack_upper(reply.arrays[f"local_info/{key}"], len(ibeta))
    return np.linalg.lstsq(info, ibeta, rcond=None)[0]


def assert_nothing_released(reply: m.Reply, *, rule: str | None = None, secrets=()) -> None:
    """The node said no, and said nothing else: no arrays, no numbers but thresholds."""
    assert reply.status in (m.REFUSED, m.ERROR), f"the node answered: {reply.status}"
    assert reply.arrays == {}
    if reply.status == m.REFUSED:
        assert set(reply.payload) == {"refusals"}
        for item in reply.payload["refusals"]:
            assert set(item) <= REFUSAL_KEYS
            assert all(isinstance(v, (str, int, float)) for v in item.values())
        if rule is not None:
            rules = [item["rule"] for item in reply.payload["refusals"]]
            assert rule in rules, f"refused for {rules}, expected {rule}: {reply.message}"
    else:
        assert reply.payload == {}
    text = reply.message + json.dumps(reply.payload)
    for secret in secrets:
        assert secret not in text, f"the reply shows {secret!r}"
    assert "Traceback" not in text
