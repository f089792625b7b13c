"""Build a model's design matrix once per study, from the node's own rows.

Categorical levels come from the schema (the analysis frame holds pandas Categoricals whose
categories are the schema levels), so every node builds the same columns in the same order,
including columns for levels it has no rows of. A study's level merges are applied to the
cohort's rows before the design is built, the same way at every node. Complete-case handling
drops rows with a missing outcome, offset or right-hand column. Centring and scaling use
pooled statistics sent by the coordinator, never local ones, so every node applies the same
transform.

Beside X and y the design keeps, for the disclosure policy only (never sent), the mask of the
dataset rows it uses and its per-level counts: rows per level of every categorical or binary
column in the formula, and for every other design column the rows away from its most common
value (a column that sets 1..7 rows apart from all others would reveal them).
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd

from ..protocol.errors import DataError
from ..protocol.formula_check import AST_LOCK, ParsedFormula, check_formula, holding_ast_lock
from ..protocol.schema import Schema
from ..protocol.study import StudySpec, check_at_node, marginal_contrast, marginal_label, merged_levels, value_text
from .cohort import cohort_mask
from .disclosure import LevelCount

#: The only names a factor can see when formulaic evaluates it (never the caller's frame).
EVAL_CONTEXT = {
    "log": np.log,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "np": SimpleNamespace(log=np.log, exp=np.exp, sqrt=np.sqrt),
}


@dataclass
class DesignedModel:
    """y, X and offset for the complete cases of one model at this node."""

    names: list[str]
    X: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    n_cohort: int
    n_missing: int
    mask: np.ndarray | None = None  # dataset rows used (kept at the node)
    levels: list = field(default_factory=list)  # disclosure.LevelCount, kept at the node
    weights: np.ndarray | None = None  # prior weights; None means 1 for every row
    clusters: np.ndarray | None = None  # cluster code per row (cov_type = "cluster" or "CR2")
    cluster_labels: list | None = None  # the cluster column's value of each code (kept at the node)
    # For a study's `marginal` entries: the design with the exposure set to 1 and to 0 (a
    # contrast: to its two values) for every row (its interactions follow), by the entry's
    # label (protocol/study.py's marginal_label); kept at the node. `settings` names the two
    # (e.g. "imd_quintile = 5"), for the policy's words.
    counterfactual: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    _gram: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return len(self.y)

    def gram(self) -> np.ndarray:
        """X'X, computed once (the leverage check and the local fit's first step use it)."""
        if self._gram is None:
            with np.errstate(over="ignore", invalid="ignore"):  # (overflow is judged by its users)
                self._gram = self.X.T @ self.X
        return self._gram

    @property
    def n_clusters(self) -> int:
        return 0 if self.clusters is None or self.n == 0 else int(self.clusters.max()) + 1

    def max_leverage(self) -> float | None:
        """The largest leverage (diagonal of the hat matrix) of a row; None without rows; NaN
        when it cannot be computed (the policy then refuses: fail closed).

        h_i = z_i' (Z'Z)^+ z_i for the design Z the statistics rest on: X with the offset as
        one more column (an offset is judged like a design column), each row scaled by the
        square root of its prior weight. Columns are scaled to unit norm first (leverage does
        not change with column scale, so a term multiplied by 1e-30 cannot overflow it), and
        the pseudo-inverse leaves out directions with no support (exact collinearity). All
        in float64."""
        if self.n == 0:
            return None
        plain = self.weights is None and not np.any(self.offset != self.offset[0])
        gram = self.gram() if plain else None  # X'X, shared with the local fit's first step
        if plain and np.all(np.isfinite(gram)) and np.all(np.isfinite(self.X)):
            Z, norms = self.X, np.sqrt(np.maximum(np.diag(gram), 0.0))
            keep = norms > 0
            if not keep.any():
                return None
            Zk = Z[:, keep] if not keep.all() else Z
            scaled = gram[np.ix_(keep, keep)] / np.outer(norms[keep], norms[keep])
            return _largest_leverage(Zk, 1.0 / norms[keep], scaled)
        Z = self.X
        if np.any(self.offset != self.offset[0]):
            Z = np.column_stack([Z, self.offset])
        return weighted_leverage(Z, self.weights)

    @property
    def parameters(self) -> int:
        """Design columns with a non-zero value at this node."""
        return int(np.count_nonzero(np.any(self.X != 0, axis=0))) if self.n else 0


def weighted_leverage(Z: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """The largest leverage of a row in Z'WZ (W = diag(weights)): how far one row alone can
    decide that matrix. None when Z has no non-zero column; NaN (refuse) when not finite."""
    if weights is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            Z = Z * np.sqrt(weights)[:, None]
    if not np.all(np.isfinite(Z)):
        return math.nan
    # Each column divided by its largest value first, so that squaring cannot overflow
    # (a column of 1e200 for one row would otherwise make every norm infinite).
    top = np.max(np.abs(Z), axis=0) if Z.size else np.zeros(Z.shape[1])
    keep = top > 0
    if not keep.any():
        return None
    Z1 = Z[:, keep] / top[keep]
    inv = 1.0 / np.sqrt(np.einsum("ij,ij->j", Z1, Z1))
    U = Z1 * inv
    return _largest_leverage(Z1, inv, U.T @ U)


def _largest_leverage(Z: np.ndarray, inv_norms: np.ndarray, scaled_gram: np.ndarray) -> float:
    """max_i z_i' (Z'Z)^+ z_i from the unit-diagonal Gram matrix of Z's columns (scaled by
    `inv_norms`): eigen-decomposition, directions without support left out; NaN refuses."""
    with np.errstate(all="ignore"):
        values, vectors = np.linalg.eigh(scaled_gram)
        if not np.all(np.isfinite(values)) or values[-1] <= 0:
            return math.nan
        kept = values > 1e-12 * values[-1]
        basis = (vectors[:, kept] / np.sqrt(values[kept])) * inv_norms[:, None]
        if kept.all() and values[0] > 1e-4 * values[-1]:
            # Well conditioned (the usual case): the projection in float32 is accurate far
            # beyond what the threshold needs, at half the cost; its entries are bounded by
            # the condition number, so nothing overflows.
            proj = Z.astype(np.float32) @ basis.astype(np.float32)
        else:
            proj = Z @ basis
        h = np.einsum("ij,ij->i", proj, proj, dtype=np.float64)
    top = float(np.max(h)) if h.size else 0.0
    return top if math.isfinite(top) else math.nan


def model_selection(frame: pd.DataFrame, spec: StudySpec, parsed: ParsedFormula):
    """(complete-case rows with merges applied, mask over the dataset's rows, n in cohort,
    n dropped as missing)."""
    mask = cohort_mask(frame, spec.where_tree())
    needed = list(dict.fromkeys([parsed.outcome, *sorted(parsed.columns), *estimation_columns(spec, frame)]))
    missing = np.zeros(len(frame), dtype=bool)
    for column in needed:  # column by column: no copy of the frame
        missing |= frame[column].isna().to_numpy()
    used = mask & ~missing
    rows = apply_merges(frame.loc[used, needed], spec)
    return rows, used, int(mask.sum()), int(np.count_nonzero(mask & missing))


def estimation_columns(spec: StudySpec, frame: pd.DataFrame) -> list[str]:
    """Columns besides the formula's that a row needs to be a complete case: the offset's,
    the weights and the cluster column."""
    out = []
    if spec.offset:
        if spec.offset in frame.columns:
            out.append(spec.offset)
        else:
            out.extend(sorted(_expression_columns(spec.offset, frame)))
    out.extend(c for c in (spec.weights, spec.cluster) if c)
    return out


@holding_ast_lock
def _expression_columns(expr: str, frame: pd.DataFrame) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name) and n.id in frame.columns}


def study_frame(frame: pd.DataFrame, spec: StudySpec, augments) -> pd.DataFrame:
    """The dataset's rows plus any columns this node computed for the study earlier."""
    if not spec.augment:
        return frame
    state = augments.get(spec.augment["state"]) if augments is not None else None
    if state is None:
        raise DataError(
            "this node has not computed the columns this step of the study needs (it may have restarted); start the study again."
        )
    return frame.join(state[list(spec.augment["columns"])])


def model_rows(frame: pd.DataFrame, spec: StudySpec, parsed: ParsedFormula) -> tuple[pd.DataFrame, int, int]:
    """The complete cases of the study's cohort: (rows, n in cohort, n dropped as missing)."""
    rows, _, n_cohort, n_missing = model_selection(frame, spec, parsed)
    return rows, n_cohort, n_missing


def apply_merges(rows: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """The study's level merges on the rows' categorical columns (same result at every node)."""
    if not spec.merge:
        return rows
    rows = rows.copy()
    for column, groups in spec.merge.items():
        if column not in rows.columns:
            continue
        col = rows[column]
        old = list(col.cat.categories)
        levels, mapping = merged_levels(old, groups)
        # Level by level, then row codes through that table (-1, missing, stays missing).
        position = {level: i for i, level in enumerate(levels)}
        table = np.array([position[mapping.get(level, level)] for level in old] + [-1], dtype=np.int64)
        rows[column] = pd.Categorical.from_codes(table[col.cat.codes.to_numpy()], categories=levels)
    return rows


@holding_ast_lock
def stateful_arguments(parsed: ParsedFormula) -> dict[str, str]:
    """For each center()/scale() factor, the expression inside it (evaluated for moments)."""
    out = {}
    for expr in parsed.stateful:
        call = ast.parse(expr, mode="eval").body
        out[expr] = ast.unparse(call.args[0])
    return out


@holding_ast_lock
def evaluate_expression(rows: pd.DataFrame, expr: str) -> np.ndarray:
    """Evaluate one already-checked factor expression on the rows, via formulaic."""
    from formulaic import model_matrix

    mm = model_matrix(f"~ 0 + I({expr})", rows, context=EVAL_CONTEXT, na_action="ignore", output="numpy")
    return np.asarray(mm, dtype=float)[:, 0]


@functools.cache
def design_materializer():
    """formulaic's pandas materializer, holding AST_LOCK only while it parses Python (a factor
    that is an expression, or a literal such as the intercept's 1), not while it looks columns
    up and encodes them: the in-process engine's nodes build their designs in parallel
    threads, and a design of plain columns then holds the lock for microseconds."""
    from formulaic.materializers import PandasMaterializer
    from interface_meta import override  # (formulaic's own interface checker asks for it)

    class LockedPandasMaterializer(PandasMaterializer):
        # A name of its own (a model spec keeps its materializer by name), chosen for no input.
        REGISTER_NAME = "iaptnet_pandas"
        REGISTER_INPUTS = ()

        @override
        def _evaluate_factor(self, factor, spec, drop_rows):
            if factor.eval_method.value == "lookup":
                return super()._evaluate_factor(factor, spec, drop_rows)
            with AST_LOCK:
                return super()._evaluate_factor(factor, spec, drop_rows)

    return LockedPandasMaterializer


def build_design(
    frame: pd.DataFrame,
    schema: Schema,
    spec: StudySpec,
    transform_state: dict | None = None,
    gate=None,
    counterfactual: tuple = (),
) -> DesignedModel:
    """Filter, drop incomplete rows and build X with formulaic; raise DataError on failure.

    `gate(rows)` is called with the model's rows (those with a positive prior weight) before
    anything is computed on them: the size rule comes first, so that no failure of a
    computation on a handful of rows can answer a question about them."""
    from formulaic import ModelSpec

    check_at_node(spec, schema)
    schema = spec.schema_with_augment(schema)
    parsed = check_formula(spec.formula, schema, spec.family, spec.source)
    rows, used, n_cohort, n_missing = model_selection(frame, spec, parsed)
    if gate is not None:
        counted = used
        if spec.weights:
            positive = rows[spec.weights].to_numpy(dtype=float) > 0
            counted = used.copy()
            counted[np.flatnonzero(used)[~positive]] = False
        gate(counted)
    rhs = legacy_ordered(spec.formula.split("~", 1)[1], schema)
    model_spec = ModelSpec(
        formula=rhs,
        materializer=design_materializer(),
        na_action="ignore",
        output="numpy",
        transform_state=dict(transform_state or {}),
    )
    if len(rows) == 0:
        names = _names_from_empty(rows, model_spec)
        p = len(names)
        return DesignedModel(names, np.zeros((0, p)), np.zeros(0), np.zeros(0), n_cohort, n_missing, used)
    try:
        mm = model_spec.get_model_matrix(rows, context=EVAL_CONTEXT)
    except Exception as exc:  # formulaic raises many types; none may carry data values out
        raise DataError(f"the formula could not be evaluated on this node's rows ({type(exc).__name__}).") from exc
    X = np.ascontiguousarray(np.asarray(mm, dtype=float))
    if not np.all(np.isfinite(X)):
        raise DataError(
            "a transform in the formula gives values that are not finite (for example log of 0) for some rows."
        )
    y = rows[parsed.outcome].to_numpy(dtype=float)
    offset = _offset(rows, spec)
    weights = None
    if spec.weights:
        weights = rows[spec.weights].to_numpy(dtype=float)
        if np.any(weights < 0) or not np.all(np.isfinite(weights)):
            raise DataError(f"the weights column '{spec.weights}' has negative or infinite values.")
    clusters, labels = pd.factorize(rows[spec.cluster], sort=True) if spec.cluster else (None, None)
    names = list(mm.model_spec.column_names)
    levels = level_counts(rows, X, names, mm.model_spec, schema, spec, parsed)
    designed = DesignedModel(names, X, y, offset, n_cohort, n_missing, used, levels, weights, clusters)
    designed.cluster_labels = None if labels is None else list(labels)
    for entry in counterfactual:
        label = marginal_label(entry)
        column, values = marginal_contrast(entry)
        designed.counterfactual[label] = tuple(_set_to(mm.model_spec, rows, column, value, X) for value in values)
        designed.settings[label] = tuple(f"{column} = {value_text(value)}" for value in values)
    return designed


def _set_to(model_spec, rows: pd.DataFrame, column: str, value, X: np.ndarray) -> np.ndarray:
    """The design with `column` set to `value` on every row (a categorical column to the level
    `value`, with the column's own levels), from the model's own spec (same levels, same pooled
    centring). Each of its columns must be constant, one of the model's own or a constant
    multiple of one (a numeric exposure set to 6 turns its interaction with x into 6 x; the
    study's check keeps an interaction's other terms in the formula), so it releases no column
    the model did not."""
    shown = value_text(value)
    if isinstance(rows[column].dtype, pd.CategoricalDtype):
        categories = rows[column].cat.categories
        if str(value) not in [str(c) for c in categories]:
            raise DataError(f"'{shown}' is not a level of '{column}' in this study's design.")
        setting = pd.Categorical([str(value)] * len(rows), categories=categories)
    else:
        setting = np.full(len(rows), float(value))
    try:
        mm = model_spec.get_model_matrix(rows.assign(**{column: setting}), context=EVAL_CONTEXT)
    except Exception as exc:  # as above: no data values in the message
        raise DataError(
            f"the design with '{column}' set to {shown} could not be built ({type(exc).__name__})."
        ) from exc
    Z = np.ascontiguousarray(np.asarray(mm, dtype=float))
    if Z.shape != X.shape or not np.all(np.isfinite(Z)):
        raise DataError(f"the design with '{column}' set to {shown} is not finite or not the model's shape.")
    own = {np.ascontiguousarray(X[:, k]).tobytes() for k in range(X.shape[1])}
    for j in range(Z.shape[1]):
        col = np.ascontiguousarray(Z[:, j])
        if not (np.all(col == col[0]) or col.tobytes() in own or _multiple_of_own(col, X)):
            raise DataError(
                f"setting '{column}' to {shown} makes a design column the model does not have; "
                "put the terms it interacts with in the formula too."
            )
    return Z


def _multiple_of_own(col: np.ndarray, X: np.ndarray) -> bool:
    """Whether `col` is c times one of X's columns (zero exactly where it is zero; c within
    1e-12 relative on every other row): its sums are c times that column's."""
    zero = col == 0
    for k in range(X.shape[1]):
        own = X[:, k]
        if not np.array_equal(zero, own == 0) or zero.all():
            continue
        ratio = col[~zero] / own[~zero]
        if np.all(np.abs(ratio - ratio[0]) <= 1e-12 * abs(ratio[0])):
            return True
    return False


def _offset(rows: pd.DataFrame, spec: StudySpec) -> np.ndarray:
    if not spec.offset:
        return np.zeros(len(rows))
    if spec.offset in rows.columns:
        values = rows[spec.offset].to_numpy(dtype=float)
    else:
        values = evaluate_expression(rows, spec.offset)
    if not np.all(np.isfinite(values)):
        raise DataError("the offset gives values that are not finite (for example log of 0) for some rows.")
    return values


def _factor_column(factor, schema: Schema) -> str | None:
    """The column of a factor that is a categorical or binary column as such (x or C(x))."""
    expr = str(factor.expr).replace(" ", "")
    method = factor.eval_method.value
    name = expr if method == "lookup" else (expr[2:-1] if expr.startswith("C(") and expr.endswith(")") else None)
    if name and name in schema and schema[name].type in ("categorical", "binary"):
        return name
    return None


def level_counts(
    rows: pd.DataFrame,
    X: np.ndarray,
    names: list[str],
    model_spec,
    schema: Schema,
    spec: StudySpec,
    parsed: ParsedFormula,
) -> list[LevelCount]:
    """Rows per level of each categorical/binary column of the formula, and rows away from
    the most common value of every other design column (see the module docstring)."""
    out: list[LevelCount] = []
    covered: set[str] = set()
    for struct in model_spec.structure:
        factors = list(struct.term.factors)
        if len(factors) == 1 and _factor_column(factors[0], schema):
            covered.update(struct.columns)
    for column in sorted(parsed.columns):
        kind = schema[column].type
        if kind == "categorical":
            order = [str(c) for c in rows[column].cat.categories]
            codes = rows[column].cat.codes.to_numpy()
            counts = np.bincount(codes[codes >= 0], minlength=len(order))
            for level, n in zip(order, counts.tolist()):
                out.append(LevelCount(column, level, int(n), _merge_hint(column, level, order, spec, schema)))
        elif kind == "binary":
            values = rows[column].to_numpy(dtype=float)
            for level in (0, 1):
                out.append(
                    LevelCount(
                        column,
                        str(level),
                        int(np.sum(values == level)),
                        f"drop the term '{column}' or use a cohort with more rows of each value",
                    )
                )
    outcome = parsed.outcome
    if schema[outcome].type == "binary" and spec.family != "binomial":
        # (a binomial outcome is judged by the events rule)
        values = rows[outcome].to_numpy(dtype=float)
        for level in (0, 1):
            out.append(
                LevelCount(
                    outcome,
                    str(level),
                    int(np.sum(values == level)),
                    "use a cohort with more rows of each outcome value",
                )
            )
    for j, name in enumerate(names):
        if name in covered or name == "Intercept":
            continue
        column = X[:, j]
        _, counts = np.unique(column, return_counts=True)
        off_mode = int(len(column) - counts.max()) if len(counts) else 0
        out.append(LevelCount(name, None, off_mode, f"drop the term '{name}' or merge the levels it involves"))
    return out


def _merge_hint(column: str, level: str, order: list[str], spec: StudySpec, schema: Schema) -> str:
    """How an analyst can avoid a refusal for a rare level: merge it, or drop the term."""
    others = [lv for lv in order if lv != level]
    if not others:
        return f"drop the term '{column}'"
    partner = next((lv for lv in others if "other" in lv.lower()), None)
    if partner is None:
        i = order.index(level)
        partner = order[i - 1] if i > 0 else order[i + 1]
    groups = dict(spec.merge.get(column, {}))

    def members(lv):
        return list(groups.pop(lv)) if lv in groups else [lv]

    merged = members(partner) + members(level)
    example = f"[merge.{column}] {partner} = [{', '.join(_quote(v) for v in merged)}]"
    for new, olds in groups.items():  # the study's other merges of this column stay
        example += f", {new} = [{', '.join(_quote(v) for v in olds)}]"
    return f"merge it with another level, e.g. {example}, or drop the term '{column}'"


def _quote(text: str) -> str:
    return '"' + text + '"'


@holding_ast_lock
def legacy_ordered(rhs: str, schema: Schema):
    """The right-hand side with terms in statsmodels' default ("legacy", patsy) order.

    Intercept first, then terms made only of categorical factors (by degree), then the rest
    grouped by their numeric factors in order of appearance, each group by degree. Which
    factors are categorical is known from the schema, so every node orders alike.
    """
    return _legacy_ordered(rhs, tuple(n for n, c in schema.columns.items() if c.is_categorical))


@functools.lru_cache(maxsize=256)
def _legacy_ordered(rhs: str, categorical_columns: tuple[str, ...]):
    from formulaic import Formula

    terms = list(Formula(rhs, _ordering="none"))

    def categorical(factor) -> bool:
        expr = str(factor.expr)
        if factor.eval_method.value == "lookup":
            return expr in categorical_columns
        return expr.replace(" ", "").startswith("C(")

    intercept = [t for t in terms if t.degree == 0]
    cats = sorted((t for t in terms if t.degree > 0 and all(categorical(f) for f in t.factors)), key=lambda t: t.degree)
    groups: dict[tuple, list] = {}
    for t in terms:
        if t.degree == 0 or t in cats:
            continue
        key = tuple(sorted(str(f.expr) for f in t.factors if not categorical(f)))
        groups.setdefault(key, []).append(t)
    rest = [t for group in groups.values() for t in sorted(group, key=lambda t: t.degree)]
    return Formula(intercept + cats + rest, _ordering="none")


def _names_from_empty(rows: pd.DataFrame, model_spec) -> list[str]:
    """Column names when the node has no complete rows: evaluate on one placeholder row."""
    placeholder = {}
    for name in rows.columns:
        col = rows[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            placeholder[name] = pd.Categorical([col.cat.categories[0]], categories=col.cat.categories)
        else:
            placeholder[name] = [1.0]
    try:
        mm = model_spec.get_model_matrix(pd.DataFrame(placeholder), context=EVAL_CONTEXT)
        return list(mm.model_spec.column_names)
    except Exception:
        return []
