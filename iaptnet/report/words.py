"""Numbers and names as an NHS analyst reads them: one format for each kind of number, and
words for codes (from the schema's `labels`) wherever a code would be shown.

Every formatter takes the raw value from results.json and returns the text the report shows,
so a test can format the same value and find it on the page.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

MISSING = "–"  # an en dash: not available (suppressed, not estimable or not asked for)

# Terms of art, explained where they appear (an <abbr> title on the page, and the glossary).
GLOSSARY = {
    "95% CI": "95% confidence interval: the range of values compatible with the data at the 5% level.",
    "OR": "Odds ratio: how many times the odds of the outcome multiply for one unit more of the term.",
    "RR": "Rate ratio: how many times the rate of the outcome multiplies for one unit more of the term.",
    "HC0": "Robust (sandwich) standard errors: valid when the model's variance assumption does not hold.",
    "cluster-robust": "Standard errors that allow outcomes within a cluster (here a service) to be related.",
    "CR2": "Cluster-robust standard errors corrected for few clusters (Bell-McCaffrey), with t tests on "
    "Satterthwaite degrees of freedom: honest intervals with eight services.",
    "SMD": "Standardised mean difference: the difference in means between the groups, in standard deviations; "
    "below 0.1 is usually taken as balanced.",
    "I²": "The share of the variation between services' estimates that is beyond chance (0% none, above 75% high).",
    "tau²": "The variance of the true effect between services (on the log scale).",
    "Newton rounds": "The iterations the coordinator took to fit the model: in each, every node sends its "
    "aggregates once.",
    "DerSimonian-Laird": "A moment estimate of the between-service variance.",
    "REML": "Restricted maximum likelihood: an estimate of the between-service variance, less biased with few "
    "services than DerSimonian-Laird.",
    "HKSJ": "Hartung-Knapp-Sidik-Jonkman: a random-effects interval on a t distribution, wider and more honest "
    "with few services.",
    "random intercept": "A service's own baseline drawn from a normal distribution across services, instead of a "
    "fixed effect per service.",
    "g-computation": "The model's predictions averaged over the referrals with the exposure set for everyone, "
    "then compared: a standardised risk.",
}


# The glossary's terms that are marked where they appear in a sentence (an <abbr> whose title
# says what it means, as a tooltip and for screen readers).
EXPLAINED = (
    "HC0",
    "SMD",
    "I²",
    "tau²",
    "Newton rounds",
    "REML",
    "DerSimonian-Laird",
    "HKSJ",
    "cluster-robust",
    "CR2",
    "random intercept",
    "g-computation",
)


def explain(text: str):
    """Text for the page (escaped), with each explained term wrapped in <abbr title=...>."""
    import re

    from markupsafe import Markup, escape

    escaped = {str(escape(term)): term for term in EXPLAINED}
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(e) for e in escaped) + r")(?!\w)")
    used = set()

    def mark(match):
        term = escaped[match.group(0)]
        if term in used:
            return match.group(0)
        used.add(term)
        return f'<abbr title="{escape(GLOSSARY[term])}">{match.group(0)}</abbr>'

    # One pass over the text: a title inserted for one term is never searched for another.
    out = pattern.sub(mark, str(escape(text)))
    return Markup(out)


def p_value(p) -> str:
    """p-values as journals print them: `<0.001`, else three decimals."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p) -> str:
    """A p-value in a sentence: `p < 0.001`, `p = 0.012`."""
    text = p_value(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def percent(value, decimals: int = 1) -> str:
    """A percentage given in percent (12.34 -> `12.3%`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{decimals}f}%"


def share(value, decimals: int = 1) -> str:
    """A proportion (0.1234 -> `12.3%`)."""
    return MISSING if value is None else percent(100.0 * value, decimals)


def number(value, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:,.{decimals}f}"


def significant(value, digits: int = 3) -> str:
    """A small positive quantity (a variance such as tau²) to `digits` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:.{digits}g}"


def count(value) -> str:
    return MISSING if value is None else f"{int(round(value)):,}"


def ratio(value, decimals: int = 2) -> str:
    return number(value, decimals) if value is not None else MISSING


def interval(low, high, decimals: int = 2) -> str:
    if low is None or high is None:
        return MISSING
    return f"{number(low, decimals)} to {number(high, decimals)}"


def ratio_with_ci(value, low, high, decimals: int = 2) -> str:
    if value is None:
        return MISSING
    return f"{number(value, decimals)} ({interval(low, high, decimals)})"


@cache
def _schema_labels() -> dict[str, tuple[str, dict[str, str]]]:
    """{column: (description-free name, {level: words})} from the IAPT schemas iaptnet ships."""
    from ..protocol.iapt_schema import iapt_analysis_schema

    schema = iapt_analysis_schema()
    out = {}
    for name, column in schema.columns.items():
        out[name] = (name.replace("_", " "), dict(column.labels))
    return out


#: (service column, {code: node name}) of the result being rendered (`services_of`).
_SERVICES: ContextVar[tuple[str | None, dict]] = ContextVar("services", default=(None, {}))


@contextmanager
def services_of(result: dict):
    """Within it, a level of the result's service column (a service's code) is named by the
    node that holds it (`service_id` `ZN2` -> `Barnet (ZN2)`)."""
    token = _SERVICES.set((result.get("service_column"), dict(result.get("services") or {})))
    try:
        yield
    finally:
        _SERVICES.reset(token)


def level_label(column: str, level) -> str:
    """A level as words with its code where the code means something on its own
    (`employment` `02` -> `unemployed, seeking work (02)`), a service by its name
    (`Barnet (ZN2)`); the level itself otherwise."""
    if level is None:
        return MISSING
    service_column, services = _SERVICES.get()
    if column == service_column and str(level) in services:
        return f"{service_name(services[str(level)])} ({level})"
    labels = _schema_labels().get(column, ("", {}))[1]
    words = labels.get(str(level))
    if words is None or words == str(level):
        return str(level)
    code = str(level)
    # A code that is not itself a word (02, F32, A) is kept beside its words.
    if code in words or not (len(code) <= 2 or any(ch.isdigit() for ch in code)):
        return words
    return f"{words} ({code})"


def column_label(column: str) -> str:
    return column.replace("_", " ")


_TERM = re.compile(r"^C?\(?(?P<column>[A-Za-z_][A-Za-z0-9_]*)\)?\[T\.(?P<level>.+)\]$")


def term_label(term: str) -> str:
    """A model term in words: `employment[T.02]` -> `employment: unemployed, seeking work (02)`,
    `a:b` -> `a × b`, `n_treat` -> `n treat`; the Intercept stays."""
    if term == "Intercept":
        return "Intercept"
    parts = []
    for piece in term.split(":"):
        match = _TERM.match(piece)
        if match:
            column = match["column"]
            parts.append(f"{column_label(column)}: {level_label(column, match['level'])}")
        else:
            parts.append(column_label(piece))
    return " × ".join(parts)


def service_name(node: str) -> str:
    """A node's name as a service name (`camden_islington` -> `Camden Islington`)."""
    return " ".join(word.capitalize() if word.islower() else word for word in str(node).split("_"))


# --- a descriptive table (Table 1 and funnel), shared by the page and the terminal --------


def table_column_labels(result: dict) -> list[str]:
    """The heads of a table's columns: `Overall`, and each level of its `by` column in words
    (`age_group` `18-24` -> `age group 18-24`), its own label where the study gave one."""
    by = result.get("by")
    heads = []
    for col in result["columns"]:
        label, level = col["label"], col.get("level")
        if by and level is not None and label == level:
            label = level_label(by, level)
        elif by and level is not None and label == f"{by} {level}":
            label = f"{column_label(by)} {level_label(by, level)}"
        elif by and level is None and label == f"{by} missing":
            label = f"{column_label(by)} missing"
        heads.append(label)
    return heads


def table_row_label(table: dict, level: str) -> str:
    """A row of a table in words: a binary's `0`/`1` as no/yes, `missing`, a level by
    `level_label` (employment `02` -> `unemployed, seeking work (02)`)."""
    if level == "missing":
        return "missing"
    if table.get("type") == "binary" and level in ("0", "1"):
        return {"0": "no", "1": "yes"}[level]
    return level_label(table["variable"], level)


def count_with_percent(count_value, percent_value) -> str:
    """A released count with its percentage (`1,485 (63.0%)`); the count alone without one."""
    text = count(count_value)
    return text if percent_value is None else f"{text} ({percent(percent_value)})"


def mean_sd(summary: dict) -> str:
    """A numeric variable's mean (SD) to one decimal (`38.7 (15.2)`)."""
    if summary.get("mean") is None:
        return MISSING
    return f"{number(summary['mean'], 1)} ({number(summary.get('sd'), 1)})"


def median_iqr(summary: dict) -> str | None:
    """A numeric variable's median [Q1, Q3] to one decimal (`36.0 [27.0, 48.0]`), a quantile
    the nodes' policies stopped the search for as the interval it lies in (`3.0..4.0`); None
    when no median was asked for."""
    q = {round(x["p"], 4): x for x in summary.get("quantiles") or []}
    if 0.5 not in q:
        return None

    def one(x):
        if x is None:
            return MISSING
        if x.get("exact") or x.get("low") == x.get("high"):
            return number(x.get("value"), 1)
        return f"{number(x.get('low'), 1)}..{number(x.get('high'), 1)}"

    return f"{one(q[0.5])} [{one(q.get(0.25))}, {one(q.get(0.75))}]"
