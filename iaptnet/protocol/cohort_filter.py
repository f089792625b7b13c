"""The cohort-filter grammar: parsed into a small tree, never evaluated as code.

A `where` string arrives from the coordinator, so it is tokenised and parsed here by a
recursive-descent parser with hard limits on length, nesting and list size; the node then
evaluates the tree on its columns (node/cohort.py). Grammar:

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | condition
    condition  := operand CMP operand
                | NAME ["not"] "in" "[" literal ("," literal)* "]"
                | NAME "is" ["not"] "missing"
    operand    := NAME | literal          (at least one side of a comparison is a column)
    literal    := NUMBER | "string" | 'string'
    CMP        := == | != | < | <= | > | >=

Trees are tuples: ("or", [..]), ("and", [..]), ("not", x), ("cmp", op, left, right),
("in", name, (values...), negated), ("missing", name, negated); operands ("col", name),
("num", float), ("str", text).
"""

from __future__ import annotations

import datetime
import math
import re

from .errors import SpecError
from .schema import Schema

MAX_LENGTH = 4000
MAX_DEPTH = 32
MAX_LIST = 500

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>"[^"\\\n]*"|'[^'\\\n]*')
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<punct>[()\[\],])
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "missing"}


class FilterSyntaxError(SpecError):
    pass


def tokenize(text: str) -> list[tuple[str, str]]:
    if len(text) > MAX_LENGTH:
        raise FilterSyntaxError(f"the filter is longer than {MAX_LENGTH} characters.")
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterSyntaxError(
                f"the filter has a character it does not allow at position {pos + 1} "
                "(allowed: column names, numbers, quoted strings, comparisons, in [...], "
                "and/or/not, parentheses, is missing)."
            )
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "name" and value in _KEYWORDS:
            kind = "kw"
        tokens.append((kind, value))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self, offset=0):
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self, kind=None, value=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind
            got = tok[1] or "the end"
            raise FilterSyntaxError(f"the filter expected {want!r} but found {got!r}.")
        self.i += 1
        return tok

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterSyntaxError(f"the filter is nested more than {MAX_DEPTH} levels deep.")

    def expr(self):
        self.enter()
        parts = [self.and_expr()]
        while self.peek() == ("kw", "or"):
            self.take()
            parts.append(self.and_expr())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else ("or", parts)

    def and_expr(self):
        parts = [self.not_expr()]
        while self.peek() == ("kw", "and"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def not_expr(self):
        if self.peek() == ("kw", "not"):
            self.take()
            self.enter()
            inner = self.not_expr()
            self.depth -= 1
            return ("not", inner)
        if self.peek() == ("punct", "("):
            self.take()
            inner = self.expr()
            self.take("punct", ")")
            return inner
        return self.condition()

    def literal(self):
        kind, value = self.peek()
        if kind == "num":
            self.take()
            if not math.isfinite(float(value)):
                raise FilterSyntaxError(f"the filter's number {value[:24]!r} is too large.")
            return ("num", float(value))
        if kind == "str":
            self.take()
            return ("str", value[1:-1])
        raise FilterSyntaxError(f"the filter expected a number or a quoted string but found {value or 'the end'!r}.")

    def operand(self):
        kind, value = self.peek()
        if kind == "name":
            self.take()
            return ("col", value)
        return self.literal()

    def condition(self):
        left = self.operand()
        kind, value = self.peek()
        if left[0] == "col" and (kind, value) in {("kw", "in"), ("kw", "not")}:
            negated = False
            if value == "not":
                self.take()
                negated = True
            self.take("kw", "in")
            self.take("punct", "[")
            values = [self.literal()]
            while self.peek() == ("punct", ","):
                self.take()
                values.append(self.literal())
                if len(values) > MAX_LIST:
                    raise FilterSyntaxError(f"a filter list may hold at most {MAX_LIST} values.")
            self.take("punct", "]")
            return ("in", left[1], tuple(values), negated)
        if left[0] == "col" and (kind, value) == ("kw", "is"):
            self.take()
            negated = False
            if self.peek() == ("kw", "not"):
                self.take()
                negated = True
            self.take("kw", "missing")
            return ("missing", left[1], negated)
        if kind != "op":
            found = value or "the end"
            raise FilterSyntaxError(
                f"the filter expected a comparison after {_render_operand(left)!r} but found {found!r}."
            )
        self.take()
        right = self.operand()
        if left[0] != "col" and right[0] != "col":
            raise FilterSyntaxError("each comparison in the filter must involve a column.")
        return ("cmp", value, left, right)


def parse(text: str) -> tuple:
    """Parse a filter string into a tree; raise FilterSyntaxError with a plain sentence."""
    if not isinstance(text, str) or not text.strip():
        raise FilterSyntaxError("the filter is empty.")
    tokens = tokenize(text)
    parser = _Parser(tokens)
    tree = parser.expr()
    if parser.i != len(tokens):
        raise FilterSyntaxError(f"the filter has unexpected text from {tokens[parser.i][1]!r} on.")
    return tree


def columns(tree: tuple) -> set[str]:
    """Every column name the tree refers to."""
    kind = tree[0]
    if kind in ("or", "and"):
        return set().union(*(columns(t) for t in tree[1]))
    if kind == "not":
        return columns(tree[1])
    if kind == "cmp":
        return {o[1] for o in tree[2:4] if o[0] == "col"}
    return {tree[1]}


def render(tree: tuple) -> str:
    """Canonical text of a tree: equal trees render equally (used in the study hash)."""
    kind = tree[0]
    if kind in ("or", "and"):
        return "(" + f" {kind} ".join(render(t) for t in tree[1]) + ")"
    if kind == "not":
        return f"not {render(tree[1])}"
    if kind == "cmp":
        return f"{_render_operand(tree[2])} {tree[1]} {_render_operand(tree[3])}"
    if kind == "in":
        vals = ", ".join(_render_operand(v) for v in tree[2])
        return f"{tree[1]} {'not in' if tree[3] else 'in'} [{vals}]"
    return f"{tree[1]} is {'not missing' if tree[2] else 'missing'}"


def _render_operand(op: tuple) -> str:
    if op[0] == "col":
        return op[1]
    if op[0] == "num":
        return repr(op[1])
    return '"' + op[1] + '"'


def conjuncts(tree: tuple) -> list[tuple]:
    """The filter as a list of conditions all of which a row must meet: top-level `and`s
    split, and `not (a or b)` read as `not a and not b` (De Morgan)."""
    kind = tree[0]
    if kind == "and":
        return [c for t in tree[1] for c in conjuncts(t)]
    if kind == "not":
        inner = tree[1]
        if inner[0] == "not":
            return conjuncts(inner[1])
        if inner[0] == "or":
            return [c for t in inner[1] for c in conjuncts(("not", t))]
    return [tree]


def by_column(tree: tuple) -> dict[str, list[tuple]]:
    """The filter's conditions grouped by the one column each names (see check_shape)."""
    out: dict[str, list[tuple]] = {}
    for condition in conjuncts(tree):
        names = columns(condition)
        out.setdefault(next(iter(names)) if len(names) == 1 else "", []).append(condition)
    return out


def check_shape(tree: tuple, source: str) -> None:
    """A cohort is conditions joined by `and`, each on one column ("age >= 18 and (sex == 'f'
    or sex == 'm')"), so every row in it is admitted by the same rule.

    Why: with `or` across columns (or a comparison of two columns) a filter can admit most
    rows through a condition on the very variable being released and one person through
    another column ("(phq9 in [5, 6] and age < 90) or age == 93"): the statistic then holds
    that person's value beside values the filter made known. Conditions each on one column
    cannot pin some rows' values and not others'."""
    for condition in conjuncts(tree):
        names = sorted(columns(condition))
        if len(names) > 1:
            quoted = [f"'{n}'" for n in names]
            listed = ", ".join(quoted[:-1]) + " and " + quoted[-1]
            raise SpecError(
                f"{source}: field 'where' has a condition on {listed} at once (joined by 'or' or 'not', or "
                f"compared with each other); a cohort must be conditions joined by 'and', "
                f'each on one column, e.g. age >= 18 and (sex == "f" or sex == "m").'
            )


def check_against_schema(tree: tuple, schema: Schema, source: str) -> None:
    """Every column exists, every comparison makes sense for the column's type, and the
    filter has the shape of a cohort (check_shape)."""
    _check_terms(tree, schema, source)
    check_shape(tree, source)


def _check_terms(tree: tuple, schema: Schema, source: str) -> None:
    kind = tree[0]
    if kind in ("or", "and"):
        for t in tree[1]:
            _check_terms(t, schema, source)
        return
    if kind == "not":
        _check_terms(tree[1], schema, source)
        return
    for name in columns(tree):
        if name not in schema:
            raise SpecError(
                f"{source}: field 'where' names column '{name}', which the dataset '{schema.name}' does not have."
            )
        if not schema[name].in_models and schema[name].type != "date":
            raise SpecError(f"{source}: field 'where' cannot use the {schema[name].type} column '{name}'.")
    if kind == "missing":
        return
    if kind == "in":
        for v in tree[2]:
            _check_literal(schema[tree[1]], v, "in", source)
        return
    op, left, right = tree[1], tree[2], tree[3]
    if left[0] == "col" and right[0] == "col":
        lt, rt = schema[left[1]], schema[right[1]]
        if (lt.type == "date") != (rt.type == "date"):
            date, other = (lt, rt) if lt.type == "date" else (rt, lt)
            raise SpecError(
                f"{source}: field 'where' compares the date column '{date.name}' with the {other.type} column "
                f"'{other.name}'; a date compares only with a date column or a quoted date \"YYYY-MM-DD\"."
            )
        if lt.is_categorical or rt.is_categorical:
            if op not in ("==", "!=") or lt.levels != rt.levels:
                raise SpecError(
                    f"{source}: field 'where' compares '{left[1]}' with '{right[1]}', which have different types or levels."
                )
        return
    col, lit = (left, right) if left[0] == "col" else (right, left)
    _check_literal(schema[col[1]], lit, op, source)


def _check_literal(col, lit, op, source):
    where = f"{source}: field 'where'"
    if col.is_categorical:
        if lit[0] != "str":
            raise SpecError(
                f"{where} compares the categorical column '{col.name}' with a number; quote the level, e.g. {col.name} == \"{col.levels[0]}\"."
            )
        if lit[1] not in col.levels:
            raise SpecError(
                f"{where} uses a level that column '{col.name}' does not have; its levels are {', '.join(col.levels)}."
            )
        if op not in ("==", "!=", "in"):
            raise SpecError(f"{where} orders the categorical column '{col.name}' with {op}; use == , != or in [...].")
        return
    if col.type == "date":
        if lit[0] != "str" or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", lit[1]):
            raise SpecError(
                f"{where} compares the date column '{col.name}' with something other than a quoted date \"YYYY-MM-DD\"."
            )
        if calendar_date(lit[1]) is None:
            raise SpecError(
                f"{where} compares the date column '{col.name}' with \"{lit[1]}\", which is not a calendar date."
            )
        return
    if lit[0] != "num":
        raise SpecError(f"{where} compares the {col.type} column '{col.name}' with a string; use a number.")


def calendar_date(text: str) -> datetime.date | None:
    """A quoted "YYYY-MM-DD" as a date; None for anything else, including dates no calendar
    has ("2020-13-45", "2020-02-30", year 0), which pandas would raise on at the node."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        return None
