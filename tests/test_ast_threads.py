"""The in-process engine runs nodes in threads, and each parses formulas and factors (here and
in formulaic). CPython 3.11 keeps the depth of its AST conversions in interpreter-wide state,
so a thread switch inside one (the garbage collector running Python finalizers) let another
thread's parse corrupt it: "SystemError: AST constructor recursion depth mismatch", seen once
in CI as a node's internal error. Every parse holds formula_check.AST_LOCK."""

from __future__ import annotations

import gc
import sys
import threading

import pandas as pd

from iaptnet.node import design
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.formula_check import check_expression, parse_formula
from iaptnet.protocol.schema import Column, Schema

EXPR = "log(" * 30 + "x + y * 2" + ")" * 30


class Cycle:
    """Garbage that runs Python code when the collector frees it: a chance to switch threads."""

    def __init__(self):
        self.me = self

    def __del__(self):
        sum(range(50))


def hammer(work, threads: int = 4, rounds: int = 3000) -> list[str]:
    errors: list[str] = []

    def run():
        for _ in range(rounds):
            Cycle()
            Cycle()
            try:
                work()
            except SpecError:
                continue  # a refusal after the parse (the nested EXPR is not an allowed term)
            except SystemError as exc:  # pragma: no cover - the failure this test guards against
                errors.append(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - any other end of a thread fails the test
                # (never left to the thread's excepthook: formatting a traceback parses its
                # source lines, which itself raced the other threads' parses in CI)
                errors.append(f"{type(exc).__name__}: {exc}")
                return

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    try:
        pool = [threading.Thread(target=run) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    return errors


def test_formulas_parse_safely_from_many_threads():
    schema = Schema("t", {"x": Column(name="x", type="numeric"), "y": Column(name="y", type="numeric")})
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]})

    assert hammer(lambda: design._expression_columns(EXPR, frame)) == []
    assert hammer(lambda: check_expression(EXPR, schema, "s", "offset"), rounds=300) == []
    assert hammer(lambda: parse_formula(f"y ~ {EXPR}"), rounds=300) == []


def test_a_node_logging_a_traceback_does_not_race_a_parse_in_another_thread():
    """Python 3.11 parses a traceback's source lines (ast) to place its carets: a node logging a
    failure with its traceback (the dispatcher's `cannot_compute`) raced the other node's
    formula parse (CI: "AST constructor recursion depth mismatch" at a psm edge case). The
    node logs them through formula_check.log_exception, which holds AST_LOCK."""
    import io
    import logging

    from iaptnet.protocol.formula_check import log_exception

    logger = logging.getLogger("iaptnet.test.ast-threads")
    logger.propagate = False
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]})
    turn = iter(range(10**9))

    def work():
        if next(turn) % 2:
            design._expression_columns(EXPR, frame)
            return
        try:
            {"a": 1}["b"] + sum(range(3)) * len([1, 2, 3])  # noqa: B018 - a line with carets
        except KeyError:
            log_exception(logger, "failed")

    try:
        assert hammer(work, rounds=1500) == []
    finally:
        logger.removeHandler(handler)
    assert "Traceback" in handler.stream.getvalue() and "^" in handler.stream.getvalue()


def test_designs_build_from_many_threads_while_others_parse():
    """Nodes build their designs in parallel: the design materializer holds AST_LOCK only
    while formulaic parses Python (an expression factor, the intercept's literal), so a design
    is built beside another thread's parse without corrupting it."""
    import numpy as np
    from formulaic import ModelSpec

    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0.0, 1.0, 1.0]})
    spec = ModelSpec(
        formula=f"1 + x + I({EXPR})", materializer=design.design_materializer(), na_action="ignore", output="numpy"
    )
    turn = iter(range(10**9))

    def work():
        if next(turn) % 2:
            design._expression_columns(EXPR, frame)
            return
        with np.errstate(all="ignore"):
            spec.get_model_matrix(frame, context=design.EVAL_CONTEXT)

    assert hammer(work, rounds=200) == []


def test_arrays_are_read_from_many_threads_while_others_parse():
    """numpy reads an array's `.npy` header with ast.literal_eval: a node reading a task's
    arrays raced another node's parse (CI: "AST constructor recursion depth mismatch" in an
    its study's glm.round). Reading a message's arrays holds AST_LOCK."""
    import numpy as np

    from iaptnet.protocol.messages import _arrays_record, arrays_from

    record = _arrays_record({f"a{i}": np.arange(6.0).reshape(2, 3) for i in range(8)})
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]})
    turn = iter(range(10**9))

    def work():
        if next(turn) % 2:
            design._expression_columns(EXPR, frame)
        else:
            arrays_from(record)

    assert hammer(work, rounds=1500) == []
