"""The node's disclosure policy: `policy.toml`, written and owned by the Trust.

The coordinator can neither read nor override it; it only learns what the node reports in a
refusal (the rule and its threshold). A production node (`iaptnet node start`) refuses to
start without one (`load_policy(None, production=True)` raises); a node of a local network
file with no `policy` runs in exploratory mode with the default thresholds below, so the demo
and analysts' trials on synthetic data work out of the box.

    # policy.toml
    mode = "approved"            # or "exploratory": also answer studies not approved below
    approved = ["<sha256>", ...] # study hashes the Trust approved (`iaptnet node approve`)
    tasks = ["glm.moments", "glm.prepare", "glm.round"]   # task kinds answered (default: all)
    state_dir = "state"          # audit log and the node's memory, relative to this file
    max_task_age_minutes = 60    # a task issued longer ago (or seen before) is a replay
    max_payload_mb = 2           # a larger task is refused before it is decoded

    [rules]                      # thresholds for approved studies
    suppress_max = 7             # table counts 1..7 are suppressed ...
    round_to = 5                 # ... and other table counts rounded to the nearest 5
    min_rows = 50                # rows a model uses at this node (0 is allowed: no rows)
    min_events = 10              # events and non-events (binomial), non-zero rows (poisson)
    max_params_per_row = 0.33    # design columns used at this node / rows (DataSHIELD's 0.33)
    min_level_count = 8          # rows per level of a categorical/binary term (0 is allowed)
    max_leverage = 0.4           # no row may dominate its own fitted value (1 = rule off)
    max_combined_leverage = 0.9  # ... nor any combination of all released model sums (1 = off)
    min_subset_difference = 8    # the subset rule (differencing)
    min_effective_rows = 10      # per-round weights: (sum w)^2 / sum w^2
    max_abs_coefficient = 50     # per-round coefficients sent by the coordinator
    max_rounds_per_study = 100   # tasks per study per day
    max_studies_per_day = 100
    max_refusals_per_day = 20    # refusals that depend on the data (each answers a yes/no question)

    [exploratory]                # unapproved studies (mode = "exploratory"): stricter values
    min_rows = 100
    ...

Every field is optional; docs/governance/policy.md#why-these-defaults gives the reasoning for each default. Values in
[exploratory] must be at least as strict as [rules]: a mistake there is a SpecError naming
the file and the field, never a traceback.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..protocol.errors import SpecError
from ..protocol.tomlfile import read_toml

MODES = ("approved", "exploratory")


@dataclass(frozen=True)
class Rules:
    """Thresholds applied to one study's releases. `min_*` and `max_*` are inclusive."""

    suppress_max: int = 7
    round_to: int = 5
    min_rows: int = 50
    min_events: int = 10
    max_params_per_row: float = 0.33
    min_level_count: int = 8
    max_leverage: float = 0.4
    max_combined_leverage: float = 0.9
    min_subset_difference: int = 8
    min_effective_rows: int = 10
    max_abs_coefficient: float = 50.0
    max_rounds_per_study: int = 100
    max_studies_per_day: int = 100
    max_refusals_per_day: int = 20


#: The stricter defaults for studies the Trust has not approved (exploratory mode).
EXPLORATORY_DEFAULTS = {
    "min_rows": 100,
    "min_events": 20,
    "min_effective_rows": 20,
    "max_rounds_per_study": 60,
    "max_studies_per_day": 25,
    "max_refusals_per_day": 10,
}

#: For each rule, which direction is stricter: +1 larger is stricter, -1 smaller is stricter.
_STRICTER = {
    "suppress_max": +1,
    "round_to": +1,
    "min_rows": +1,
    "min_events": +1,
    "max_params_per_row": -1,
    "min_level_count": +1,
    "max_leverage": -1,
    "max_combined_leverage": -1,
    "min_subset_difference": +1,
    "min_effective_rows": +1,
    "max_abs_coefficient": -1,
    "max_rounds_per_study": -1,
    "max_studies_per_day": -1,
    "max_refusals_per_day": -1,
}
_RULE_LIMITS = {  # (smallest allowed, largest allowed)
    "suppress_max": (0, 1000),
    "round_to": (1, 1000),
    "min_rows": (1, 10**9),
    "min_events": (1, 10**9),
    "max_params_per_row": (0.001, 1.0),
    "min_level_count": (1, 10**9),
    "max_leverage": (0.01, 1.0),
    "max_combined_leverage": (0.01, 1.0),
    "min_subset_difference": (1, 10**9),
    "min_effective_rows": (1, 10**9),
    "max_abs_coefficient": (1.0, 1e6),
    "max_rounds_per_study": (1, 10**6),
    "max_studies_per_day": (1, 10**6),
    "max_refusals_per_day": (1, 10**6),
}
_TOP_KEYS = {"mode", "approved", "tasks", "state_dir", "max_task_age_minutes", "max_payload_mb", "rules", "exploratory"}


@dataclass(frozen=True)
class Policy:
    path: Path | None = None
    mode: str = "exploratory"
    approved: frozenset[str] = frozenset()
    tasks: frozenset[str] | None = None  # None: every task kind the node knows
    rules: Rules = field(default_factory=Rules)
    exploratory: Rules = field(default_factory=lambda: replace(Rules(), **EXPLORATORY_DEFAULTS))
    state_dir: Path | None = None  # None: the node keeps its audit log and memory in memory
    max_task_age_seconds: float = 3600.0
    max_payload_bytes: int = 2_000_000

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "the built-in exploratory policy"

    def is_approved(self, study_hash: str) -> bool:
        return study_hash in self.approved

    def rules_for(self, approved: bool) -> Rules:
        return self.rules if approved else self.exploratory

    def allows_kind(self, kind: str) -> bool:
        return self.tasks is None or kind in self.tasks


def default_policy() -> Policy:
    """The policy of a node with no policy file: exploratory, default thresholds, in memory."""
    return Policy()


def load_policy(path: str | Path | None, *, production: bool) -> Policy:
    """Read and validate a policy file; raise SpecError with one sentence naming the field.

    `production=True` (a deployed node) requires a file; without one a node of a local
    network serves in exploratory mode with the default thresholds."""
    if path is None or str(path) == "":
        if production:
            raise SpecError(
                "a production node needs a policy file: give its path (policy.toml) in the "
                "node's configuration; docs/governance/policy.md has a template with the defaults."
            )
        return default_policy()
    path = Path(path)
    data = read_toml(path, "policy file")
    return parse_policy(data, path)


def parse_policy(data: dict, path: Path) -> Policy:
    def fail(key: str, sentence: str) -> SpecError:
        return SpecError(f"{path}: field '{key}' {sentence}")

    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(sorted(unknown)[0], f"is not a policy field (expected {', '.join(sorted(_TOP_KEYS))}).")
    mode = data.get("mode", "approved")
    if mode not in MODES:
        raise fail("mode", f'must be "approved" or "exploratory", got {mode!r}.')
    approved = data.get("approved", [])
    if not isinstance(approved, list) or not all(isinstance(h, str) for h in approved):
        raise fail("approved", "must be a list of study hashes (64 hexadecimal characters each).")
    for h in approved:
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise fail(
                "approved", f"holds {h[:70]!r}, which is not a study hash (64 lower-case hexadecimal characters)."
            )
    tasks = data.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise fail(
                "tasks", 'must be a non-empty list of task kinds, e.g. ["glm.moments", "glm.prepare", "glm.round"].'
            )
        tasks = frozenset(tasks)
    state_dir = data.get("state_dir", "state")
    if not isinstance(state_dir, str) or not state_dir.strip():
        raise fail("state_dir", "must be a folder path (relative to the policy file or absolute).")
    state = Path(state_dir)
    state = state if state.is_absolute() else path.parent / state
    age = _number(data, "max_task_age_minutes", 60, 1, 7 * 24 * 60, fail)
    payload_mb = _number(data, "max_payload_mb", 2, 0.01, 1024, fail)
    rules = _rules(data.get("rules", {}), Rules(), "rules", fail)
    explo_base = replace(
        rules, **{k: v for k, v in EXPLORATORY_DEFAULTS.items() if _at_least_as_strict(k, v, getattr(rules, k))}
    )
    exploratory = _rules(data.get("exploratory", {}), explo_base, "exploratory", fail)
    for f in fields(Rules):
        if not _at_least_as_strict(f.name, getattr(exploratory, f.name), getattr(rules, f.name)):
            word = "at least" if _STRICTER[f.name] > 0 else "at most"
            raise fail(
                f"exploratory.{f.name}",
                f"must be {word} the value in [rules] ({getattr(rules, f.name)}): "
                "unapproved studies get stricter limits, never looser ones.",
            )
    return Policy(
        path=path,
        mode=mode,
        approved=frozenset(approved),
        tasks=tasks,
        rules=rules,
        exploratory=exploratory,
        state_dir=state,
        max_task_age_seconds=float(age) * 60.0,
        max_payload_bytes=int(float(payload_mb) * 1_000_000),
    )


def _at_least_as_strict(name: str, value, base) -> bool:
    return value >= base if _STRICTER[name] > 0 else value <= base


def _number(data, key, default, low, high, fail):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(key, f"must be a number between {low:g} and {high:g}.")
    if not low <= value <= high:
        raise fail(key, f"must be between {low:g} and {high:g}, got {value:g}.")
    return value


def _rules(table, base: Rules, section: str, fail) -> Rules:
    if not isinstance(table, dict):
        raise fail(section, "must be a table of thresholds, e.g. [" + section + "] min_rows = 50.")
    names = {f.name: f for f in fields(Rules)}
    values = {}
    for key, value in table.items():
        if key not in names:
            raise fail(f"{section}.{key}", f"is not a rule (expected {', '.join(names)}).")
        low, high = _RULE_LIMITS[key]
        is_float = names[key].type == "float"
        ok_type = (isinstance(value, (int, float)) if is_float else isinstance(value, int)) and not isinstance(
            value, bool
        )
        if not ok_type or (is_float and not math.isfinite(value)):
            kind = "a number" if is_float else "a whole number"
            raise fail(f"{section}.{key}", f"must be {kind} between {low:g} and {high:g}.")
        if not low <= value <= high:
            raise fail(f"{section}.{key}", f"must be between {low:g} and {high:g}, got {value:g}.")
        values[key] = float(value) if is_float else int(value)
    return replace(base, **values)


# --------------------------------------------------------------------------- small numbers


def round_count(count: float | int, rules: Rules) -> int | None:
    """A table count under the small-number rules: 0 stays 0, 1..suppress_max is suppressed
    (None, shown as '*'), anything else is rounded to the nearest `round_to` (halves up)."""
    from ..protocol import sdc  # the one rule (protocol/sdc.py), with this Trust's thresholds

    return sdc.round_count(count, rules.suppress_max, rules.round_to)


# --------------------------------------------------------------------------- approve


def add_approved_hash(path: Path, study_hash: str) -> bool:
    """Add a study hash to the `approved` list of a policy file, keeping its comments and
    layout; returns False when it was already approved. The file is re-validated."""
    policy = load_policy(path, production=False)
    if study_hash in policy.approved:
        return False
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    entry = f'    "{study_hash}",\n'
    start = next((i for i, line in enumerate(lines) if _is_top_key(line, "approved")), None)
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    if start is not None and start < first_table:
        # The array may be written on one line or across several; rewrite it in the
        # multi-line form with the new hash at the end.
        end = start
        depth = 0
        for end in range(start, len(lines)):
            depth += _brackets(lines[end])
            if depth <= 0 and "]" in lines[end]:
                break
        current = sorted(policy.approved, key=lambda h: text.find(h))
        block = ["approved = [\n", *(f'    "{h}",\n' for h in current), entry, "]\n"]
        lines[start : end + 1] = block
    else:
        block = ["approved = [\n", entry, "]\n"]
        lines[first_table:first_table] = block + (["\n"] if first_table < len(lines) else [])
    new_text = "".join(lines)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new_text)
    try:
        parse_policy(tomllib.loads(new_text), path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return True


def _is_top_key(line: str, key: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(key) and stripped[len(key) :].lstrip().startswith("=")


def _brackets(line: str) -> int:
    code = line.split("#", 1)[0]
    return code.count("[") - code.count("]")
