"""Check a model formula against a fixed whitelist of transforms before anything evaluates it.

Formula libraries evaluate each factor as Python, and a formula arrives from the coordinator.
So the formula is first scanned (length, nesting, term powers), then parsed by formulaic's
parser (which evaluates nothing), and every factor's Python expression must match one of
these forms exactly (walked with `ast`, never evaluated here):

- a column `x`; `C(g)` of a categorical column; `center(x)`, `scale(x)` of a numeric column;
- inside `I(...)`: an affine function of ONE numeric column, `a`, written `x`, `x + c`,
  `x - c`, `c + x`, `c * x`, `x * c`, `x / c`; or its square or cube, `a ** 2`, `a ** 3`;
- `log(a)` and `sqrt(a)` (or `np.log`, `np.sqrt`), bare or inside `I(...)`, only when the
  schema's declared range of the column makes `a` positive (log) or not negative (sqrt).

Constants are 0 or between 1e-3 and 1e6 in size. Why so few: a transform decides which rows a
statistic rests on. A polynomial of high degree, a product of shifted columns, a constant of
1e-30 or an exponential can make a column that equals another except for one person's row,
or that is negligible for every row but one, or that overflows a check; the node's rules judge
columns, and only columns whose shape the schema bounds can be judged. The node repeats this
check on every study it receives.
"""

from __future__ import annotations

import ast
import functools
import io
import threading
import tokenize
from dataclasses import dataclass

from .errors import SpecError
from .schema import Schema

#: CPython 3.11 keeps the depth of its AST conversions (ast.parse, compile of a tree) in
#: interpreter-wide state: two threads parsing at once (the in-process engine's nodes, each
#: building a design with formulaic) can fail with "SystemError: AST constructor recursion depth
#: mismatch" (CPython gh-106905). Every parse of a formula or a factor, here and in formulaic
#: (node/design.py's materializer), holds this lock (`holding_ast_lock`), and so does every
#: numpy load of an array in a node's path (numpy reads an `.npy` header with
#: `ast.literal_eval`: `load_arrays` below for files, protocol/messages.py's `arrays_from`
#: for a message's arrays). Compiling source text
#: (imports) does not build Python AST objects and is safe.
AST_LOCK = threading.RLock()


def log_exception(logger, msg: str, *args) -> None:
    """`logger.exception(msg, *args)` while holding AST_LOCK: Python 3.11 parses the source
    lines of a traceback (ast) to place its carets, which races with a parse in another node's
    thread as any other parse does."""
    with AST_LOCK:
        logger.exception(msg, *args)


def load_arrays(path):
    """`np.load` of an `.npy` file (its array) or an `.npz` file (its arrays by name, all read
    now), holding AST_LOCK: numpy reads each array's header with `ast.literal_eval`."""
    import numpy as np

    with AST_LOCK, np.load(path, allow_pickle=False) as loaded:
        return {name: loaded[name] for name in loaded.files}


def load_array(path):
    """`np.load` of an `.npy` file, holding AST_LOCK (see load_arrays)."""
    import numpy as np

    with AST_LOCK:
        return np.load(path, allow_pickle=False)


def holding_ast_lock(fn):
    """`fn` run while holding AST_LOCK."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with AST_LOCK:
            return fn(*args, **kwargs)

    return locked


MAX_LENGTH = 4000
MAX_NESTING = 12
MAX_TERMS = 400
MAX_TERM_POWER = 3

#: The calls a factor may make (the whitelist above says where).
ALLOWED_CALLS = ("C", "I", "log", "sqrt", "center", "scale")
_FUNCTIONS = {"log", "sqrt"}
#: transforms whose value depends on the whole column (pooled state needed).
STATEFUL_CALLS = ("center", "scale")
#: Constants in a transform are 0 or between these sizes.
MIN_CONSTANT, MAX_CONSTANT = 1e-3, 1e6
POWERS = (2, 3)
TRANSFORMABLE = ("numeric", "integer")


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
            if (
                nxt is None
                or nxt.type != tokenize.NUMBER
                or not nxt.string.isdigit()
                or int(nxt.string) > MAX_TERM_POWER
            ):
                raise _fail(source, f"raises terms to a power above {MAX_TERM_POWER}; write the interactions you need.")
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER):
            prev = tok


@functools.lru_cache(maxsize=256)
@holding_ast_lock
def parse_formula(text: str, source: str = "study") -> ParsedFormulaParts:
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


@holding_ast_lock
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


@holding_ast_lock
def check_expression(expr: str, schema: Schema, source: str, field: str) -> frozenset[str]:
    """Check a standalone expression (an offset such as `log(n_dna + n_treat)`) against the
    same allowed transforms as a formula factor; return the columns it reads."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > 500:
        raise SpecError(f"{source}: field '{field}' must be a column or a short expression of columns.")
    if expr in schema:
        _check_column(expr, schema, source)
        return frozenset({expr})
    if (
        "C(" in expr.replace(" ", "")
        or "I(" in expr.replace(" ", "")
        or any(f"{c}(" in expr.replace(" ", "") for c in STATEFUL_CALLS)
    ):
        raise SpecError(
            f"{source}: field '{field}' may not use C(), I(), center() or scale(); an offset is a column, "
            "an affine function of one column, or log() or sqrt() of one."
        )
    try:
        tree = ast.parse(expr, mode="eval")
        checker = _Whitelist(schema, source)
        call = _Whitelist.call_name(tree.body)
        if call in _FUNCTIONS or (call and call.startswith("np.")):
            names = checker.function(call, tree.body.args[0] if len(tree.body.args) == 1 else None, tree.body)
        else:
            names = {checker.affine(tree.body)[0]}
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise SpecError(f"{source}: field '{field}' is not a valid expression.") from None
    except SpecError as exc:
        raise SpecError(str(exc).replace("field 'formula'", f"field '{field}'")) from None
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
        "negative_binomial": ("integer", "numeric", "binary"),
        "gaussian": ("numeric", "integer", "binary"),
    }[family]
    if col.type not in ok:
        raise _fail(
            source, f"has outcome '{col.name}' of type {col.type}; a {family} model needs a {' or '.join(ok)} outcome."
        )
    if family in ("poisson", "negative_binomial") and col.min is not None and col.min < 0:
        raise _fail(source, f"has outcome '{col.name}', which may be negative; a {family} model needs counts.")


def _check_python_factor(expr: str, schema: Schema, source: str) -> set[str]:
    """The columns of a factor expression that matches the whitelist; SpecError otherwise."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _fail(source, f"has a term that is not a valid expression: {expr!r}.") from None
    return _Whitelist(schema, source).factor(tree.body)


class _Whitelist:
    """Matches one factor against the whitelist (module docstring); returns its columns."""

    def __init__(self, schema: Schema, source: str):
        self.schema, self.source = schema, source

    def fail(self, node) -> SpecError:
        try:
            shown = ast.unparse(node)[:80]
        except Exception:  # noqa: BLE001 - a shape ast cannot print
            shown = "a term"
        return _fail(
            self.source,
            f"has the term {shown!r}, which is not an allowed transform (allowed: a column, "
            "C(g), center(x), scale(x), I(a), I(a ** 2), I(a ** 3), log(a) and sqrt(a) where "
            "a is x, x + c, x - c, c * x or x / c for one numeric column x whose declared range "
            f"keeps log and sqrt finite, and constants 0 or between {MIN_CONSTANT:g} and "
            f"{MAX_CONSTANT:g} in size).",
        )

    def factor(self, node) -> set[str]:
        if isinstance(node, ast.Name):
            return {self.column(node)}
        name = self.call_name(node)
        if name is None:
            raise self.fail(node)
        args = node.args
        if node.keywords or len(args) != 1 or any(isinstance(a, ast.Starred) for a in args):
            raise _fail(self.source, f"calls {name}() with other than exactly one argument.")
        arg = args[0]
        if name == "C":
            if not isinstance(arg, ast.Name):
                raise _fail(self.source, "may only apply C() to a column name.")
            if arg.id in self.schema and self.schema[arg.id].type != "categorical":
                raise _fail(
                    self.source,
                    f"applies C() to the {self.schema[arg.id].type} column '{arg.id}'; C() needs a "
                    f"categorical column whose levels the schema declares (use '{arg.id}' directly).",
                )
            return {self.column(arg)}
        if name in STATEFUL_CALLS:
            if not isinstance(arg, ast.Name):
                raise _fail(self.source, f"may only apply {name}() to a column name.")
            return {self.column(arg, TRANSFORMABLE)}
        if name == "I":
            return self.inner(arg)
        return self.function(name, arg, node)

    def inner(self, node) -> set[str]:
        """Inside I(): an affine term, its square or cube, or log/sqrt of an affine term."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            power = node.right
            if not (isinstance(power, ast.Constant) and type(power.value) is int and power.value in POWERS):
                raise _fail(self.source, f"may only raise a term to the power {' or '.join(map(str, POWERS))}.")
            column, _ = self.affine(node.left)
            return {column}
        name = self.call_name(node)
        if name in _FUNCTIONS:
            return self.function(name, node.args[0] if len(node.args) == 1 else None, node)
        column, _ = self.affine(node)
        return {column}

    def function(self, name: str, arg, node) -> set[str]:
        if arg is None or node.keywords:
            raise self.fail(node)
        column, (low, _) = self.affine(arg)
        fn = name.split(".")[-1]
        if fn == "log" and not (low is not None and low > 0):
            raise _fail(
                self.source,
                f"takes log() of an expression of '{column}' that the schema does not keep "
                "positive; declare the column's min (above 0) in the schema, or add a constant.",
            )
        if fn == "sqrt" and not (low is not None and low >= 0):
            raise _fail(
                self.source,
                f"takes sqrt() of an expression of '{column}' that the schema does not keep "
                "at or above 0; declare the column's min in the schema, or add a constant.",
            )
        return {column}

    def affine(self, node) -> tuple[str, tuple[float | None, float | None]]:
        """(column, its declared range mapped through the affine function) for x and, with a
        an affine term of the same kind, a + c, a - c, c + a, c - a, c * a, a * c, a / c;
        anything else (two columns, a power, a call) fails."""
        if isinstance(node, ast.Name):
            col = self.column(node, TRANSFORMABLE)
            c = self.schema[col]
            return col, (c.min, c.max)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left_const, right_const = self.constant(node.left), self.constant(node.right)
            if right_const is None and left_const is not None and not isinstance(node.op, ast.Div):
                col, (lo, hi) = self.affine(node.right)
                if isinstance(node.op, ast.Add):
                    return col, _shift(lo, hi, left_const)
                if isinstance(node.op, ast.Sub):
                    return col, _shift(*_scale(lo, hi, -1.0), left_const)
                return col, _scale(lo, hi, left_const)
            if left_const is None and right_const is not None:
                col, (lo, hi) = self.affine(node.left)
                if isinstance(node.op, ast.Add):
                    return col, _shift(lo, hi, right_const)
                if isinstance(node.op, ast.Sub):
                    return col, _shift(lo, hi, -right_const)
                if isinstance(node.op, ast.Mult):
                    return col, _scale(lo, hi, right_const)
                if right_const == 0:
                    raise _fail(self.source, "divides by zero.")
                return col, _scale(lo, hi, 1.0 / right_const)
        raise self.fail(node)

    def constant(self, node) -> float | None:
        negative = False
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            negative, node = isinstance(node.op, ast.USub), node.operand
        if not isinstance(node, ast.Constant):
            return None
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(self.source, "may only contain numbers as constants in transforms.")
        try:
            value = float(value)
        except OverflowError:
            raise _fail(self.source, "has a constant that is too large.") from None
        if value != 0 and not (MIN_CONSTANT <= abs(value) <= MAX_CONSTANT):
            raise _fail(
                self.source,
                f"has a constant of size {abs(value):g}; constants in transforms are 0 or between "
                f"{MIN_CONSTANT:g} and {MAX_CONSTANT:g}, so that no transform concentrates a column on a few rows.",
            )
        return -value if negative else value

    def column(self, node: ast.Name, types: tuple[str, ...] | None = None) -> str:
        if node.id in ALLOWED_CALLS or node.id == "np":
            raise _fail(self.source, f"uses {node.id!r} other than as a call.")
        _check_column(node.id, self.schema, self.source)
        if types is not None and self.schema[node.id].type not in types:
            raise _fail(
                self.source,
                f"transforms the {self.schema[node.id].type} column '{node.id}'; only numeric and "
                "integer columns can be transformed.",
            )
        return node.id

    @staticmethod
    def call_name(node) -> str | None:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        if isinstance(func, ast.Name) and func.id in ALLOWED_CALLS:
            return func.id
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "np"
            and func.attr in _FUNCTIONS
        ):
            return f"np.{func.attr}"
        return None


def _shift(lo, hi, c):
    return (None if lo is None else lo + c), (None if hi is None else hi + c)


def _scale(lo, hi, c):
    a = None if lo is None else lo * c
    b = None if hi is None else hi * c
    return (a, b) if c >= 0 else (b, a)
