"""Check a model formula against a fixed list of allowed transforms before anything evaluates it.

Formula libraries evaluate each factor as Python, and a formula arrives from the coordinator.
So the formula is first scanned (length, nesting, term powers), then parsed by formulaic's
parser (which evaluates nothing), and every factor's Python expression is walked with `ast`:
only schema column names, numbers, arithmetic, and the calls in ALLOWED_CALLS pass. Nothing
can reach an attribute (other than np.log / np.exp / np.sqrt), call anything off the list, or
build a huge number.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from dataclasses import dataclass

from .errors import SpecError
from .schema import Schema

MAX_LENGTH = 4000
MAX_NESTING = 12
MAX_TERMS = 400
MAX_TERM_POWER = 3
MAX_EXPONENT = 10

#: calls a factor may make; each takes exactly one argument except C (see _check_call).
ALLOWED_CALLS = ("C", "I", "log", "exp", "sqrt", "center", "scale")
_NP_CALLS = {"log", "exp", "sqrt"}
#: transforms whose value depends on the whole column (pooled state needed).
STATEFUL_CALLS = ("center", "scale")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


@dataclass(frozen=True)
class ParsedFormula:
    text: str
    outcome: str
    columns: frozenset[str]  # every column the right-hand side reads
    stateful: tuple[str, ...]  # factor expressions using center()/scale()
    has_intercept: bool
    n_terms: int


def _fail(source: str, sentence: str) -> SpecError:
    return SpecError(f"{source}: field 'formula' {sentence}")


def _prescan(text: str, source: str) -> None:
    """Reject what could make the parser itself slow: length, nesting, big term powers."""
    if len(text) > MAX_LENGTH:
        raise _fail(source, f"is longer than {MAX_LENGTH} characters.")
    if text.count("~") != 1:
        raise _fail(source, "must have exactly one '~' between the outcome and the terms.")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        raise _fail(source, "is not well formed (unbalanced brackets or quotes).") from None
    stack: list[bool] = []  # True where the bracket opened a call's argument list
    prev = None
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
            raise _fail(source, f"has a character it does not allow ({tok.string!r}).")
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append(tok.string == "(" and prev is not None and prev.type == tokenize.NAME)
            if len(stack) > MAX_NESTING:
                raise _fail(source, f"is nested more than {MAX_NESTING} brackets deep.")
        elif tok.type == tokenize.OP and tok.string in ")]}":
            if stack:
                stack.pop()
        elif tok.type == tokenize.OP and tok.string in ("|", "."):
            raise _fail(source, f"uses {tok.string!r}, which is not supported; list the terms explicitly.")
        elif tok.type == tokenize.OP and tok.string == "**" and not any(stack):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt.type != tokenize.NUMBER or not nxt.string.isdigit() or int(nxt.string) > MAX_TERM_POWER:
                raise _fail(source, f"raises terms to a power above {MAX_TERM_POWER}; write the interactions you need.")
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER):
            prev = tok


@functools.lru_cache(maxsize=256)
def parse_formula(text: str, source: str = "study") -> "ParsedFormulaParts":
    """Scan and parse with formulaic; returns the outcome and the right-hand factors.
    Cached: a node parses the same formulas at every task of a study."""
    from formulaic import Formula  # the parser only; nothing is evaluated
    from formulaic.errors import FormulaicError

    if not isinstance(text, str) or not text.strip():
        raise _fail(source, "is empty.")
    _prescan(text, source)
    try:
        parsed = Formula(text)
    except (FormulaicError, ValueError, TypeError, RecursionError) as exc:
        raise _fail(source, f"cannot be parsed ({type(exc).__name__}).") from None
    lhs = getattr(parsed, "lhs", None)
    rhs = getattr(parsed, "rhs", None)
    if lhs is None or rhs is None:
        raise _fail(source, "must name an outcome on the left of '~'.")
    lhs_terms = list(lhs)
    if len(lhs_terms) != 1 or len(lhs_terms[0].factors) != 1:
        raise _fail(source, "must have a single outcome column on the left of '~'.")
    rhs_terms = list(rhs)
    if len(rhs_terms) > MAX_TERMS:
        raise _fail(source, f"expands to more than {MAX_TERMS} terms.")
    return ParsedFormulaParts(lhs_terms[0].factors[0], rhs_terms)


@dataclass
class ParsedFormulaParts:
    outcome_factor: object
    rhs_terms: list


def check_formula(text: str, schema: Schema, family: str, source: str = "study") -> ParsedFormula:
    """Validate a formula against the schema and the allowed transforms; raise SpecError."""
    parts = parse_formula(text, source)
    outcome_factor = parts.outcome_factor
    if outcome_factor.eval_method.value != "lookup":
        raise _fail(source, "must have a plain column as its outcome (no transforms on the left of '~').")
    outcome = str(outcome_factor.expr)
    _check_column(outcome, schema, source)
    _check_outcome_type(schema[outcome], family, source)
    used: set[str] = set()
    stateful: list[str] = []
    has_intercept = False
    for term in parts.rhs_terms:
        for factor in term.factors:
            method = factor.eval_method.value
            expr = str(factor.expr)
            if method == "literal":
                if expr not in ("1", "0"):
                    raise _fail(source, f"has a literal term {expr!r}; only 1 and 0 (intercept) are allowed.")
                has_intercept = has_intercept or expr == "1"
                continue
            if method == "lookup":
                _check_column(expr, schema, source)
                used.add(expr)
                continue
            names = _check_python_factor(expr, schema, source)
            used.update(names)
            if any(f"{name}(" in expr.replace(" ", "") for name in STATEFUL_CALLS):
                stateful.append(expr)
    if outcome in used:
        raise _fail(source, f"uses the outcome '{outcome}' as a term too.")
    return ParsedFormula(
        text=text,
        outcome=outcome,
        columns=frozenset(used),
        stateful=tuple(dict.fromkeys(stateful)),
        has_intercept=has_intercept,
        n_terms=len(parts.rhs_terms),
    )


def check_expression(expr: str, schema: Schema, source: str, field: str) -> frozenset[str]:
    """Check a standalone expression (an offset such as `log(n_dna + n_treat)`) against the
    same allowed transforms as a formula factor; return the columns it reads."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > 500:
        raise SpecError(f"{source}: field '{field}' must be a column or a short expression of columns.")
    if expr in schema:
        _check_column(expr, schema, source)
        return frozenset({expr})
    try:
        names = _check_python_factor(expr, schema, source)
    except SpecError as exc:
        raise SpecError(str(exc).replace("field 'formula'", f"field '{field}'")) from None
    if "C(" in expr.replace(" ", "") or any(f"{c}(" in expr.replace(" ", "") for c in STATEFUL_CALLS):
        raise SpecError(f"{source}: field '{field}' may not use C(), center() or scale().")
    return frozenset(names)


def _check_column(name: str, schema: Schema, source: str) -> None:
    if name not in schema:
        raise _fail(source, f"names column '{name}', which the dataset '{schema.name}' does not have.")
    if not schema[name].in_models:
        raise _fail(source, f"uses the {schema[name].type} column '{name}', which cannot appear in a model.")


def _check_outcome_type(col, family: str, source: str) -> None:
    ok = {
        "binomial": ("binary",),
        "poisson": ("integer", "numeric", "binary"),
        "gaussian": ("numeric", "integer", "binary"),
    }[family]
    if col.type not in ok:
        raise _fail(source, f"has outcome '{col.name}' of type {col.type}; a {family} model needs a {' or '.join(ok)} outcome.")
    if family == "poisson" and col.min is not None and col.min < 0:
        raise _fail(source, f"has outcome '{col.name}', which may be negative; a poisson model needs counts.")


def _check_python_factor(expr: str, schema: Schema, source: str) -> set[str]:
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _fail(source, f"has a term that is not a valid expression: {expr!r}.") from None
    names: set[str] = set()
    _walk(tree.body, schema, source, names, depth=0, in_call=None)
    return names


def _walk(node, schema, source, names, depth, in_call):
    if depth > MAX_NESTING:
        raise _fail(source, f"has a term nested more than {MAX_NESTING} levels deep.")
    if isinstance(node, ast.Name):
        if node.id in ALLOWED_CALLS or node.id == "np":
            raise _fail(source, f"uses {node.id!r} other than as a call.")
        _check_column(node.id, schema, source)
        names.add(node.id)
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _fail(source, "may only contain numbers as constants in transforms.")
        if abs(node.value) > 1e15:
            raise _fail(source, "has a constant that is too large.")
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        _walk(node.operand, schema, source, names, depth + 1, in_call)
        return
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        if isinstance(node.op, ast.Pow):
            exp = node.right
            if isinstance(exp, ast.UnaryOp) and isinstance(exp.op, ast.USub):
                exp = exp.operand
            if not (isinstance(exp, ast.Constant) and isinstance(exp.value, (int, float))
                    and not isinstance(exp.value, bool) and abs(exp.value) <= MAX_EXPONENT):
                raise _fail(source, f"may only raise to a constant power of at most {MAX_EXPONENT}.")
            if not _mentions_column(node.left):
                raise _fail(source, "may only raise an expression containing a column to a power.")
        _walk(node.left, schema, source, names, depth + 1, in_call)
        _walk(node.right, schema, source, names, depth + 1, in_call)
        return
    if isinstance(node, ast.Call):
        fname = _call_name(node.func, source)
        _check_call(fname, node, schema, source)
        for arg in node.args:
            _walk(arg, schema, source, names, depth + 1, fname)
        return
    raise _fail(source, f"uses {type(node).__name__.lower()} syntax, which is not an allowed transform "
                        f"(allowed: column names, numbers, + - * / **, {', '.join(ALLOWED_CALLS)}).")


def _call_name(func, source) -> str:
    if isinstance(func, ast.Name) and func.id in ALLOWED_CALLS:
        return func.id
    if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "np" and func.attr in _NP_CALLS):
        return f"np.{func.attr}"
    shown = ast.unparse(func) if hasattr(ast, "unparse") else "a function"
    raise _fail(source, f"calls {shown!r}, which is not an allowed transform (allowed: {', '.join(ALLOWED_CALLS)}).")


def _check_call(fname, node, schema, source):
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise _fail(source, f"passes options to {fname}(); only a single argument is allowed.")
    if len(node.args) != 1:
        raise _fail(source, f"calls {fname}() with {len(node.args)} arguments; it takes exactly one.")
    if fname == "C":
        arg = node.args[0]
        if not isinstance(arg, ast.Name):
            raise _fail(source, "may only apply C() to a column name.")
        if arg.id in schema and schema[arg.id].type != "categorical":
            raise _fail(source, f"applies C() to the {schema[arg.id].type} column '{arg.id}'; C() needs a categorical column whose levels the schema declares (use '{arg.id}' directly).")


def _mentions_column(node) -> bool:
    return any(isinstance(n, ast.Name) and n.id not in ALLOWED_CALLS and n.id != "np" for n in ast.walk(node))
