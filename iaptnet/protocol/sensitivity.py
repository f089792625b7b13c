"""A GLM study's sensitivity analyses (its `[sensitivity]` table): the companion studies it
stands for, and how their results fold back into the study's. Pure: no I/O, no pandas.

    [sensitivity]
    cluster = "service_id"           # CR2 standard errors clustered by this column
    random_intercept = "service_id"  # a random intercept for this column
    marginal = true                  # the exposure's risk difference and risk ratio

Each of `cluster` and `random_intercept` is a companion study: the study's own fields, with
the column's fixed effect (a bare `+ COLUMN` term) taken out of the formula and, for
`cluster`, cov_type = "CR2" and cluster = COLUMN; for `random_intercept`, random_intercept =
COLUMN (Laplace). The fixed effect goes because each cluster alone determines its own
dummy: with it, CR2's adjustment of that cluster does not exist (the node refuses it, see
node/cr2.py), and a random intercept beside a fixed one for the same groups is not
identified. A companion is an ordinary study with its own hash (`<name>.cr2`,
`<name>.random_intercept`): a Trust that approves studies by hash approves it too, and the
nodes judge its releases like any other. `marginal = true` adds the exposure to the study's
own `marginal` list (its hash changes accordingly); a study whose exposure is not binary gives
its contrast in its own `marginal` field instead (e.g. marginal = [{exposure = "n_treat",
compare = [6, 2]}]), which is folded in the same way.

The companions' results are folded into the study's as `sensitivity`, one entry each (see
`fold`), with the study's own marginal entry last; the demo prints them and the report shows
them beside the main estimate.
"""

from __future__ import annotations

from .errors import SpecError

FIELD = "sensitivity"
KEYS = ("cluster", "random_intercept", "marginal")
#: Companion name suffixes, by the field that asks for them.
SUFFIXES = {"cluster": ".cr2", "random_intercept": ".random_intercept"}
ANALYSES = {"cluster": "cr2", "random_intercept": "random_intercept"}


def split_terms(rhs: str) -> list[str]:
    """A formula's right-hand side cut at its top-level '+' signs (not inside brackets)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(rhs):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "+" and depth == 0:
            terms.append(rhs[start:i].strip())
            start = i + 1
    terms.append(rhs[start:].strip())
    return terms


def without_term(formula: str, column: str, source: str) -> str:
    """`formula` without the fixed effect of `column` (a bare `column` or `C(column)` term);
    unchanged if it has none. SpecError if the column is used in any other way (an interaction,
    a transform): the companion would not be the same model without it."""
    if "~" not in formula:
        raise SpecError(f"{source}: field 'formula' must have the form 'outcome ~ terms'.")
    lhs, rhs = formula.split("~", 1)
    kept = []
    for term in split_terms(rhs):
        compact = term.replace(" ", "")
        if compact in (column, f"C({column})"):
            continue
        if _mentions(compact, column):
            raise SpecError(
                f"{source}: [sensitivity] needs '{column}' in the formula only as its own term "
                f"(it is in '{term}'); the sensitivity analyses replace that term."
            )
        kept.append(term)
    if not kept:
        kept = ["1"]
    return f"{lhs.strip()} ~ {' + '.join(kept)}"


def _mentions(text: str, column: str) -> bool:
    import re

    return re.search(rf"(?<![A-Za-z0-9_.]){re.escape(column)}(?![A-Za-z0-9_])", text) is not None


def expand(data: dict, source: str) -> tuple[dict, list[tuple[str, dict]]]:
    """(the study's own fields, [(analysis, companion study fields), ...]) from a study file's
    fields; the study unchanged, with no companions, without a [sensitivity] table."""
    if FIELD not in data:
        return data, []
    table = data[FIELD]
    where = f"{source}: [sensitivity]"
    if data.get("kind", "glm") != "glm":
        raise SpecError(f"{where} is for GLM studies, not kind = {data.get('kind')!r}.")
    if not isinstance(table, dict) or not table:
        raise SpecError(
            f'{where} must be a table, e.g. cluster = "service_id", random_intercept = "service_id", marginal = true.'
        )
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise SpecError(f"{where} has unknown field '{unknown[0]}'; it may have {', '.join(KEYS)}.")
    for key in ("cluster", "random_intercept"):
        if key in table and (not isinstance(table[key], str) or not table[key].strip()):
            raise SpecError(f'{where}.{key} must name a column of the dataset, e.g. "service_id".')
    if "marginal" in table and not isinstance(table["marginal"], bool):
        raise SpecError(f"{where}.marginal must be true or false.")
    for key in ("cov_type", "cluster", "random_intercept", "nagq", "reml"):
        if key in data:
            raise SpecError(
                f"{source}: a study with [sensitivity] sets no '{key}' of its own: its main estimate is the "
                "plain model's, and the sensitivity analyses are the companions it asks for."
            )
    own = {k: v for k, v in data.items() if k != FIELD}
    if table.get("marginal"):
        exposure = data.get("exposure")
        if not isinstance(exposure, str) or not exposure:
            raise SpecError(f"{where}.marginal needs the study's 'exposure' (a binary column).")
        if "marginal" in data:
            raise SpecError(f"{where}.marginal = true and a 'marginal' field: give the exposures once.")
        own["marginal"] = [exposure]
    if not isinstance(data.get("name"), str) or not isinstance(data.get("formula"), str):
        return own, []  # the study's own parse says what is missing
    companions = []
    for key in ("cluster", "random_intercept"):
        if key not in table:
            continue
        column = table[key].strip()
        companion = {k: v for k, v in own.items() if k not in ("marginal", "reference")}
        companion["name"] = data["name"].strip() + SUFFIXES[key]
        companion["formula"] = without_term(data["formula"], column, source)
        if key == "cluster":
            companion.update(cov_type="CR2", cluster=column)
        else:
            companion["random_intercept"] = column
        companions.append((ANALYSES[key], companion))
    return own, companions


def parse_with_companions(data: dict, schema, source: str):
    """A study file's fields parsed (protocol/study.py's parse_study), with its companions':
    ((spec, parsed), [(analysis, (spec, parsed)), ...])."""
    from .study import parse_study

    own, companions = expand(data, source)
    return parse_study(own, schema, source), [
        (analysis, parse_study(fields, schema, f"{source} [sensitivity]")) for analysis, fields in companions
    ]


#: Keys of a companion's exposure term kept in its sensitivity entry.
TERM_KEYS = (
    "term",
    "estimate",
    "std_error",
    "statistic",
    "df",
    "p_value",
    "conf_low",
    "conf_high",
    "ratio",
    "ratio_low",
    "ratio_high",
)


def _contrast_of(entry: dict, exposure) -> bool:
    """Whether a `marginal` contrast is the study's exposure's: a contrast of the exposure
    column (`n_treat`), or of the exposure's level against another (`imd_quintile[T.5]`: the
    contrast of imd_quintile that compares "5" with a level)."""
    column, values = entry.get("exposure"), entry.get("compare") or []
    if not isinstance(exposure, str) or not column or not values:
        return False
    return exposure == column or exposure in (f"{column}[T.{values[0]}]", f"C({column})[T.{values[0]}]")


def fold(result: dict, companions: list[tuple[str, dict]]) -> dict:
    """The study's results with `sensitivity`: per companion (analysis, its results) an entry
    with what it is, its formula, referrals, and its exposure term; then the study's own risk
    difference for its exposure, when it has one (its `marginal` entry for the exposure, or the
    first contrast of the exposure's column)."""
    entries = []
    for analysis, other in companions:
        term = other.get("exposure_term") or {}
        entry = {
            "analysis": analysis,
            "study": other.get("study"),
            "study_hash": other.get("study_hash"),
            "formula": other.get("formula"),
            "n": other.get("n"),
            "converged": other.get("converged"),
            "term": {k: term[k] for k in TERM_KEYS if k in term} or None,
        }
        if analysis == "cr2":
            entry["cluster"] = other.get("cluster")
            entry["n_clusters"] = other.get("n_clusters")
        else:
            entry["variance_components"] = other.get("variance_components")
            entry["n_groups"] = other.get("n_groups")
        entries.append(entry)
    exposure = result.get("exposure")
    for m in result.get("marginal") or []:
        if m.get("term") == exposure or _contrast_of(m, exposure):
            entries.append({"analysis": "marginal", "term": dict(m)})
            break
    if entries:
        result = {**result, FIELD: entries}
    return result
