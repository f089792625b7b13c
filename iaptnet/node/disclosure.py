"""What a task handler releases, declared so that the node's policy can judge it.

A handler never builds its reply. It returns a `Release`, saying for every number what kind
of thing it is; `dispatch.dispatch` runs the node's policy over the declaration before
anything leaves, builds the reply from what passed, and writes the audit entry. Whatever a
handler does not declare cannot reach the reply, a model or round section without facts is
refused, and a handler that returns a bare `Reply` carrying payload or arrays is refused
(fail closed). So a new task kind cannot forget the policy.

Register a handler with `@handler(kind, studies=...)` (node/registry.py): `"payload"` when the
task carries its studies as wire specs in `payload["models"]` (the dispatcher checks their
hashes against the Trust's approvals), `"prepared"` when it continues a study this node
prepared, `"none"` when it reads no rows (it may then release only public strings).

Three kinds of release:

- **model statistics** (`release.model(key, facts)`): exact numbers computed on a set of
  rows (rows used, events, sums of scores, information matrices, local fits, moments). They
  must be exact for the pooled result to equal a regression on the pooled rows, so they are
  not rounded; they are guarded by the model rules over the declared `ModelFacts`: minimum
  rows, minimum events and non-events, parameters per row, rows per level of every
  categorical or binary term and per design column, the largest leverage of a row, and the
  subset rule (the rows used must not differ by 1..threshold-1 people from the whole dataset
  or from any row set released before). For a design matrix, `glm.model_facts(label,
  design, family)` builds the facts (levels and leverage included) from a `DesignedModel`.
- **per-round statistics** (`release.round(key, facts, coefficients=..., weights=...,
  history=...)`): statistics at coefficients chosen by the coordinator. They are guarded
  against probing: the coefficients must be finite and (`bounded=True`) not too large, and
  each row weight vector the statistics sum over (e.g. IRLS weights, fitted means) must not
  rest on a few rows, set a few rows apart from the value most rows share, or differ in only
  a few rows from the same vector at the rounds already answered for the model (`history`).
- **count tables** (`release.table(key, facts=...)`, or `section.count(name, n)` inside any
  section): counts shown as counts. The dispatcher applies the small-number rules (0 stays 0,
  1..7 suppressed as None, others rounded to the nearest 5 by default); a statistic over a
  cell (`section.cell_statistic(name, value, n)`, e.g. a mean) is suppressed with its cell.
  A table with `facts` is also held to the subset rule.

Plus `release.public(key, text)` for strings that say nothing about rows (a data version
hash), and `release.after(fn)` for what to do only once the release has passed and been
audited (e.g. keep a prepared study). Values of model sections go to
`payload[group][key][name]`, table counts likewise, arrays to `arrays[name]` (unique names).

A descriptive table (issue 5 style):

    from .disclosure import ModelFacts, Release
    from .registry import handler

    @handler("describe.table", studies="payload")
    def describe_table(runtime, task) -> Release:
        rows = ...                                   # bool mask over the dataset's rows
        release = Release()
        table = release.table("sex_by_service", facts=ModelFacts("sex by service", rows))
        for level, n in counts.items():
            table.count(level, n)                    # rounded / suppressed by the policy
            table.cell_statistic(f"{level}/mean_phq9", means[level], n)
        return release

An exact statistic, e.g. a local propensity-score fit, and a per-round reply:

        section = release.model("ps", glm.model_facts("propensity", design, "binomial"))
        section.value("n_used", design.n)
        section.array("ps/info", pack_upper(info))
        ...
        section = release.round("ps", facts, coefficients=beta,
                                weights={"information": w, "fitted": mu},
                                history={"information": [w_at_earlier_rounds, ...]})
        section.array("ps/score", score)

A handler that withholds part of its release because the differencing audit found it a few
people away from a remembered set (a table cell, a summary, a quantile threshold) calls
`withheld_by_audit()`: the gap says as much as a refusal would, so the dispatcher counts the
task once against the policy's `max_refusals_per_day`.

A handler may also refuse itself with `raise Refusal(Violation(rule, sentence, threshold))`:
the rule, its threshold and the term/level concerned, never a value of the data.
`Violation.sentence` is what the coordinator shows after "<node> refused: ".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from ..protocol.messages import render_refusal
from .policy import Rules, round_count
from .release_memory import Footprint

KINDS = ("model", "round", "table")

TASK_RULES: ContextVar = ContextVar("iaptnet_task_rules", default=None)
#: Set by the dispatcher per task to [False]; `withheld_by_audit` makes it [True].
TASK_WITHHELD: ContextVar = ContextVar("iaptnet_task_withheld", default=None)


def task_rules() -> Rules:
    """The policy's rules for the task being handled: for a handler that adapts what it
    declares (e.g. withholds one table cell rather than have the whole task refused), or
    judges the size rule before it computes. The dispatcher still judges everything the
    handler declares."""
    rules = TASK_RULES.get()
    if rules is None:
        raise RuntimeError("task_rules() is only available inside a task handler")
    return rules


def withheld_by_audit() -> None:
    """Note that the task withholds something because the differencing audit found its rows
    a few people away from a set released before: a yes/no answer, rationed like a refusal."""
    flag = TASK_WITHHELD.get()
    if flag is None:
        raise RuntimeError("withheld_by_audit() is only available inside a task handler")
    flag[0] = True


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Violation:
    """One broken rule. `sentence` is plain words free of data values; `threshold` is the
    policy's value (or None for rules without one)."""

    rule: str
    sentence: str
    threshold: float | int | None = None
    model: str | None = None
    term: str | None = None
    level: str | None = None
    fix: str | None = None

    def as_dict(self) -> dict:
        return {
            k: v
            for k, v in {
                "rule": self.rule,
                "sentence": self.sentence,
                "threshold": self.threshold,
                "model": self.model,
                "term": self.term,
                "level": self.level,
                "fix": self.fix,
            }.items()
            if v is not None
        }

    def render(self) -> str:
        return render_refusal(self.as_dict())


class Refusal(Exception):
    """Raised by the policy (or by a handler) to refuse a task; carries the violations."""

    def __init__(self, violations: Violation | Iterable[Violation]):
        if isinstance(violations, Violation):
            violations = [violations]
        self.violations = list(violations)
        super().__init__("; ".join(v.render() for v in self.violations))

    @property
    def rule(self) -> str:
        return self.violations[0].rule if self.violations else "refused"


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class LevelCount:
    """Rows at this node with one level of a categorical or binary term (`level` set), or
    with a non-zero value / one of the two values of a design column (`level` None)."""

    term: str
    level: str | None
    count: int
    fix: str = ""
    cluster: bool = False  # a cluster of cluster-robust SEs (`term` names the clustering)
    # A cluster whose own statistics are released as a model's (CR2's adjusted sums): it is
    # held to min_rows as well as min_level_count.
    model_sized: bool = False
    what: str = "a cluster of the cluster-robust variance"  # how a refusal names such a cluster


@dataclass
class ModelFacts:
    """What the policy needs to know about the rows behind a release; stays at the node.

    `rows` is a boolean mask over all rows of the node's dataset: the rows the statistics
    rest on. `cohort`: the size rule applies to them (at least `min_rows`, an empty set
    included: 0 rows and a few rows get the same refusal, so that a refusal never tells one
    from the other). `combine`: they join the differencing audit's combinations of row sets
    (every set the node released exact statistics on); sets only compared in pairs (quantile
    thresholds) say False. `indicators` (0/1 columns as (name, dataset row numbers), or masks
    over the dataset) and `columns` (values on
    `rows`, in dataset order) are what the statistics sum over besides the rows themselves:
    design columns, offsets, summarised variables; the audit compares them with every column
    released before. `parameters` is the number of design columns with a non-zero value here
    (None when the release is not a model). `events`: binomial rows with the outcome, poisson
    rows with a non-zero outcome. `max_leverage`: the largest diagonal element of X(X'X)^-X'
    (near 1 when some combination of the terms sets one row apart; NaN when it could not be
    computed, which refuses). `weights` and `offset` (on `rows`): prior weights and offset,
    judged like IRLS weights and design columns."""

    label: str
    rows: np.ndarray
    parameters: int | None = None
    family: str | None = None
    events: int | None = None
    levels: list[LevelCount] = field(default_factory=list)
    max_leverage: float | None = None
    cohort: bool = True
    combine: bool = True
    indicators: list[np.ndarray] = field(default_factory=list)
    columns: list[np.ndarray] = field(default_factory=list)
    weights: np.ndarray | None = None
    offset: np.ndarray | None = None
    column_rows: np.ndarray | None = None  # the rows `columns` are given on, when not `rows`
    # Count cells shown over the rows (dataset row numbers each; node/cell_audit.py).
    cells: list[np.ndarray] = field(default_factory=list)
    # The cells that join the span, when not all (the others are sums of these; cell_audit.py).
    span_cells: list[np.ndarray] | None = None
    # Joins the span of released columns (node/span.py): models' sums and a table's cohort with
    # its count cells do; a table's summaries and thresholds have their own rules (set
    # combinations, tails).
    span: bool = True

    def __post_init__(self):
        self.rows = np.asarray(self.rows, dtype=bool)

    @property
    def n_rows(self) -> int:
        return int(self.rows.sum())

    @property
    def n_base(self) -> int:
        return int(self.rows.size)

    def footprint(self) -> Footprint:
        """What the differencing audit remembers of these rows (built once per content)."""
        key = (
            len(self.indicators),
            len(self.columns),
            len(self.cells),
            None if self.span_cells is None else len(self.span_cells),
        )
        cached = self.__dict__.get("_footprint")
        if cached is None or cached[0] != key:
            cached = (
                key,
                Footprint(
                    self.label,
                    self.rows,
                    combine=self.combine,
                    indicators=list(self.indicators),
                    columns=list(self.columns),
                    column_rows=self.column_rows,
                    cells=list(self.cells),
                    span_cells=None if self.span_cells is None else list(self.span_cells),
                ),
            )
            self.__dict__["_footprint"] = cached
        return cached[1]


# --------------------------------------------------------------------------- declaration


class Section:
    """One declared block of a release. Created by `Release.model/round/table`."""

    def __init__(
        self,
        kind: str,
        key: str,
        group: str,
        facts: ModelFacts | None,
        *,
        coefficients: np.ndarray | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
        history: Mapping[str, list[np.ndarray]] | None = None,
        bounded: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        self.kind, self.key, self.group, self.facts = kind, key, group, facts
        self.coefficients = None if coefficients is None else np.asarray(coefficients, dtype=float)
        self.weights = {k: _weights(v) for k, v in (weights or {}).items()}
        self.history = {k: [_weights(h) for h in v] for k, v in (history or {}).items()}
        self.bounded = bounded
        self.values: dict = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.counts: dict[str, float] = {}
        self.cell_stats: dict[str, tuple[float, float]] = {}

    def rests_on(self, weights: Mapping[str, np.ndarray]) -> Section:
        """Row weights of sums this node computed at coefficients it chose itself (its own fit
        at prepare): judged as a round's weights are, before anything is released."""
        self.weights.update({k: _weights(v) for k, v in weights.items()})
        return self

    def value(self, name: str, value) -> Section:
        """An exact statistic (number, string or list of them) of a model or round section."""
        if self.kind == "table":
            raise TypeError("a table section releases counts and cell statistics only")
        self.values[name] = value
        return self

    def array(self, name: str, value) -> Section:
        """An exact array statistic of a model or round section; the name is global."""
        if self.kind == "table":
            raise TypeError("a table section releases counts and cell statistics only")
        self.arrays[name] = np.asarray(value, dtype=float)
        return self

    def count(self, name: str, n: float | int) -> Section:
        """A count shown as a count: released under the small-number rules."""
        self.counts[name] = float(n)
        return self

    def cell_statistic(self, name: str, value: float, n: float | int) -> Section:
        """A statistic over n rows (a mean, an SD): released only when n is not a small number."""
        self.cell_stats[name] = (float(value), float(n))
        return self


class Release:
    """Everything a handler wants to release, by kind. See the module docstring."""

    def __init__(self):
        self.public_values: dict[str, str | list[str]] = {}
        self.sections: list[Section] = []
        self.on_release: list = []
        self.on_commit: list = []

    def remember(self, fn) -> None:
        """Run fn() when the release has passed, before it is logged and sent: state the
        node's defences rely on later (if fn fails, nothing is released)."""
        self.on_commit.append(fn)

    def after(self, fn) -> None:
        """Run fn() once the release has passed the policy and been written to the audit log
        (e.g. keep a prepared study for later rounds); never when it is refused."""
        self.on_release.append(fn)

    def public(self, key: str, value: str | list[str]) -> None:
        """A string (or list of strings) that says nothing about rows, e.g. a data version."""
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok:
            raise TypeError("public values are strings; numbers computed on rows are model statistics or counts")
        self.public_values[key] = value

    def model(self, key: str, facts: ModelFacts, *, group: str = "models") -> Section:
        return self._add(Section("model", key, group, facts))

    def round(
        self,
        key: str,
        facts: ModelFacts,
        *,
        coefficients,
        weights: Mapping[str, np.ndarray],
        history: Mapping[str, list[np.ndarray]] | None = None,
        bounded: bool = True,
        group: str = "models",
    ) -> Section:
        """Statistics at coordinator-chosen coefficients. `weights`: each row weight vector the
        statistics are weighted sums over; `history`: the same vectors at the rounds already
        answered for this model; `bounded`: apply the coefficient bound (False when the
        statistics do not depend on the coefficients beyond known algebra, e.g. gaussian)."""
        return self._add(
            Section(
                "round", key, group, facts, coefficients=coefficients, weights=weights, history=history, bounded=bounded
            )
        )

    def table(self, key: str, *, facts: ModelFacts | None = None, group: str = "tables") -> Section:
        return self._add(Section("table", key, group, facts))

    def _add(self, section: Section) -> Section:
        self.sections.append(section)
        return section


# --------------------------------------------------------------------------- the rules


def check_declaration(release: Release) -> list[Violation]:
    """Fail closed: model and round sections must declare their facts."""
    out = []
    for s in release.sections:
        if s.kind in ("model", "round") and s.facts is None:
            out.append(Violation("undeclared", f"the task's handler did not declare the rows behind '{s.key}'"))
    return out


def too_small(label: str | None, rules: Rules) -> Violation:
    """The one reply for a cohort below `min_rows`, whatever its size (0 included) and
    whatever else is wrong with it: the size rule is judged first and alone."""
    return Violation(
        "min_rows",
        f"the study's rows at this node are fewer than {rules.min_rows}",
        rules.min_rows,
        model=label,
        fix="widen the cohort, or set min_nodes in the study so that it can continue without this node",
    )


def check_size(facts: ModelFacts, rules: Rules) -> list[Violation]:
    if facts.cohort and not facts.n_rows >= rules.min_rows:
        return [too_small(facts.label, rules)]
    return []


def require_rows(rows: np.ndarray, label: str | None, rules: Rules) -> None:
    """For a handler, before it computes anything on a cohort: refuse a cohort below the
    minimum at once, so that no computation failure on a few rows can answer a question."""
    if not int(np.count_nonzero(rows)) >= rules.min_rows:
        raise Refusal(too_small(label, rules))


def check_model(facts: ModelFacts, rules: Rules) -> list[Violation]:
    """Events, parameters per row, rows per level, leverage, and the prior weights and offset
    of one model's rows (the size rule comes first, in `check_size`). Every comparison is
    written so that a value that could not be computed (NaN) refuses."""
    out: list[Violation] = []
    n = facts.n_rows
    label = facts.label
    if n == 0:
        return out
    if facts.parameters is not None and not facts.parameters <= rules.max_params_per_row * n:
        out.append(
            Violation(
                "max_params_per_row",
                "the model has too many parameters for the rows it uses at this node "
                "(a nearly saturated model reveals rows)",
                rules.max_params_per_row,
                model=label,
                fix="use fewer terms (merge levels, drop interactions) or a wider cohort",
            )
        )
    if facts.events is not None and facts.family in ("binomial", "poisson", "negative_binomial"):
        if facts.family == "binomial":
            groups = (("events", facts.events), ("non-events", n - facts.events))
        else:
            groups = (("rows with a non-zero outcome", facts.events),)
        for what, count in groups:
            if not count >= rules.min_events:
                out.append(
                    Violation(
                        "min_events",
                        f"the outcome has fewer than {rules.min_events} {what} at this node",
                        rules.min_events,
                        model=label,
                        fix="widen the cohort, or set min_nodes in the study so that it can continue without this node",
                    )
                )
    if facts.max_leverage is not None and rules.max_leverage < 1.0 and not facts.max_leverage <= rules.max_leverage:
        out.append(
            Violation(
                "max_leverage",
                "a combination of the model's terms sets one or two people at this node apart from "
                "everyone else (a row's leverage is above the limit)",
                rules.max_leverage,
                model=label,
                fix="drop terms that nearly duplicate each other, or merge rare combinations of levels",
            )
        )
    for lc in facts.levels:
        if lc.model_sized and 0 < lc.count < rules.min_rows:
            out.append(
                Violation(
                    "min_rows",
                    f"a cluster of the CR2 variance has fewer than {rules.min_rows} rows",
                    rules.min_rows,
                    model=label,
                    term=lc.term,
                    fix=lc.fix or None,
                )
            )
            continue
        if 0 < lc.count < rules.min_level_count:
            if lc.cluster:
                sentence = f"{lc.what} has fewer than {rules.min_level_count} rows"
            elif lc.level is not None:
                sentence = f"level '{lc.level}' of {lc.term} has fewer than {rules.min_level_count} rows"
            else:
                sentence = (
                    f"the design column '{lc.term}' has fewer than {rules.min_level_count} rows with one of its values"
                )
            out.append(
                Violation(
                    "min_level_count",
                    sentence,
                    rules.min_level_count,
                    model=label,
                    term=lc.term,
                    level=lc.level,
                    fix=lc.fix or None,
                )
            )
    out += _check_shaping(facts, rules)
    return out


#: Prior weights below this share of the largest one would hide rows' contributions at a scale
#: no rule sees; legitimate weights (survey, inverse probability) never span such a range.
MIN_WEIGHT_RATIO = 1e-6


def _check_shaping(facts: ModelFacts, rules: Rules) -> list[Violation]:
    """Prior weights and offsets change which rows a statistic rests on: judged like IRLS
    weights (effective rows, a few rows set apart) and like a design column."""
    out = []
    label = facts.label
    w = facts.weights
    if w is not None and w.size:
        w = np.asarray(w, dtype=float)
        top = float(np.max(w)) if np.all(np.isfinite(w)) else math.nan
        positive = w[w > 0]
        if not top > 0 or (positive.size and not float(positive.min()) >= MIN_WEIGHT_RATIO * top):
            out.append(
                Violation(
                    "prior_weights",
                    "the prior weights are not finite, all zero, or span more than six "
                    "orders of magnitude (tiny weights would hide rows from every rule)",
                    model=label,
                    fix="use weights of comparable size, or none",
                )
            )
        elif not effective_rows(w) >= rules.min_effective_rows:
            out.append(
                Violation(
                    "min_effective_rows",
                    f"the prior weights rest on fewer than {rules.min_effective_rows} effective rows",
                    rules.min_effective_rows,
                    model=label,
                    fix="use weights that do not concentrate on a few rows, or none",
                )
            )
        elif not _spread(w, float(np.median(w))) >= rules.min_level_count:
            out.append(
                Violation(
                    "min_effective_rows",
                    f"the prior weights set fewer than {rules.min_level_count} rows apart from all others",
                    rules.min_level_count,
                    model=label,
                    fix="use weights that do not single out a few rows, or none",
                )
            )
    off = facts.offset
    if off is not None and off.size:
        off = np.asarray(off, dtype=float)
        if not np.all(np.isfinite(off)):
            out.append(Violation("offset", "the offset is not a finite number for every row", model=label))
        else:
            values, counts = np.unique(off, return_counts=True)
            off_mode = int(off.size - counts.max())
            if 0 < off_mode < rules.min_level_count or not _spread(off, float(np.median(off))) >= rules.min_level_count:
                out.append(
                    Violation(
                        "offset",
                        f"the offset sets fewer than {rules.min_level_count} rows apart from all others",
                        rules.min_level_count,
                        model=label,
                        fix="use an offset that varies across many rows (e.g. log of person-time), or none",
                    )
                )
    return out


def _weights(v) -> np.ndarray:
    """Row weights as float64, or as booleans when they are 0/1 indicators (rows counted)."""
    v = np.asarray(v)
    return v if v.dtype == bool else np.asarray(v, dtype=float)


def effective_rows(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of non-negative weights: how many rows the weights really use."""
    if weights.dtype == bool:  # 0/1 weights: the rows counted
        k = int(np.count_nonzero(weights))
        return math.inf if k == 0 else float(k)
    w = np.abs(np.asarray(weights, dtype=float))
    if w.size == 0:
        return math.inf
    top = float(w.max()) if np.all(np.isfinite(w)) else math.inf
    if top == 0.0:
        return math.inf  # nothing weighted: nothing about any row
    if not math.isfinite(top):
        return 0.0
    w = w / top
    return float(w.sum() ** 2 / np.sum(w * w))


def _spread(values: np.ndarray, reference: np.ndarray | float) -> float:
    """Effective rows of the change from a reference; inf when nothing changes measurably."""
    if values.dtype == bool and (np.ndim(reference) == 0 or np.asarray(reference).dtype == bool):
        changed = int(
            np.count_nonzero(values != (np.asarray(reference) >= 0.5 if np.ndim(reference) == 0 else reference))
        )
        return math.inf if changed == 0 else float(changed)
    delta = np.abs(values - reference)
    scale = max(float(np.max(np.abs(values))) if values.size else 0.0, 1e-300)
    if values.size == 0 or float(delta.max()) <= 1e-9 * scale:
        return math.inf
    return effective_rows(delta)


def check_round(section: Section, rules: Rules) -> list[Violation]:
    """Probing defences for statistics at coordinator-chosen coefficients."""
    out: list[Violation] = []
    label = section.facts.label if section.facts else section.key
    beta = section.coefficients
    if beta is not None:
        if not np.all(np.isfinite(beta)):
            return [Violation("finite_coefficients", "the coefficients sent are not all finite numbers", model=label)]
        if section.bounded and beta.size and not float(np.max(np.abs(beta))) <= rules.max_abs_coefficient:
            out.append(
                Violation(
                    "max_abs_coefficient",
                    "a coefficient sent is larger in size than this node answers for",
                    rules.max_abs_coefficient,
                    model=label,
                    fix="such coefficients usually mean perfect prediction by a level; merge that level or drop the term",
                )
            )
            return out
    if section.facts is not None and section.facts.n_rows == 0:
        return out
    at = "at the coefficients sent" if section.kind == "round" else "at this node's own estimate"
    for name, w in section.weights.items():
        # The first broken check is enough: one sentence per refused round. Written so that
        # a NaN (a check that could not be computed) refuses.
        if not effective_rows(w) >= rules.min_effective_rows:
            return [
                Violation(
                    "min_effective_rows",
                    f"{at}, the {name} weights rest on fewer than {rules.min_effective_rows} effective rows",
                    rules.min_effective_rows,
                    model=label,
                )
            ]
        # Everyone alike but a few rows: X'w minus the known sums would isolate those rows.
        if not _spread(w, float(np.median(w))) >= rules.min_level_count:
            return [
                Violation(
                    "min_effective_rows",
                    f"{at}, the {name} weights set fewer than {rules.min_level_count} rows apart from all others",
                    rules.min_level_count,
                    model=label,
                )
            ]
        for previous in section.history.get(name, []):
            if previous.shape == w.shape and not _spread(w, previous) >= rules.min_level_count:
                return [
                    Violation(
                        "min_effective_rows",
                        f"compared with a round this node already answered, the coefficients "
                        f"sent change the {name} weights of fewer than {rules.min_level_count} rows",
                        rules.min_level_count,
                        model=label,
                    )
                ]
    return out


def all_finite(release: Release, rules: Rules) -> bool:
    """Whether every number the release would send is finite: a NaN or an infinity never
    leaves a node (it could encode a row's value, and it breaks the coordinator's solver)."""
    for s in release.sections:
        for value in s.values.values():
            if not _finite_value(value):
                return False
        for arr in s.arrays.values():
            if not np.all(np.isfinite(arr)):
                return False
        for n in s.counts.values():
            if not math.isfinite(n):
                return False
        for value, n in s.cell_stats.values():
            if not math.isfinite(n):
                return False
            if n != 0 and round_count(n, rules) is not None and not math.isfinite(value):
                return False  # (a statistic suppressed with its cell is not sent)
    return True


def _finite_value(value) -> bool:
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, (int, float, np.integer, np.floating)):
        return math.isfinite(float(value))
    if isinstance(value, np.ndarray):
        return value.dtype.kind not in "fc" or bool(np.all(np.isfinite(value)))
    if isinstance(value, (list, tuple)):
        return all(_finite_value(v) for v in value)
    return True


# --------------------------------------------------------------------------- building the reply


def finish(release: Release, rules: Rules) -> tuple[dict, dict[str, np.ndarray]]:
    """The reply's payload and arrays from a release that passed: counts rounded/suppressed."""
    payload: dict = dict(release.public_values)
    arrays: dict[str, np.ndarray] = {}
    for s in release.sections:
        if s.values or s.counts or s.cell_stats:
            block = payload.setdefault(s.group, {})
            if not isinstance(block, dict):
                raise ValueError(f"release group '{s.group}' clashes with a public value")
            entry = block.setdefault(s.key, {})
        else:
            entry = {}
        for name, value in s.values.items():
            _no_clash(entry, name)
            entry[name] = _jsonable(value)
        for name, n in s.counts.items():
            _no_clash(entry, name)
            entry[name] = round_count(n, rules)
        for name, (value, n) in s.cell_stats.items():
            _no_clash(entry, name)
            entry[name] = None if round_count(n, rules) is None or n == 0 else float(value)
        for name, arr in s.arrays.items():
            if name in arrays:
                raise ValueError(f"two sections release an array named '{name}'")
            arrays[name] = arr
    return payload, arrays


def _no_clash(entry: dict, name: str) -> None:
    if name in entry:
        raise ValueError(f"a release names '{name}' twice")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
