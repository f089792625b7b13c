"""The one door every task goes through at the node.

`dispatch` receives a decoded `Task` and, in this order:

1. **gate**: refuses a replayed task (an id answered before, or issued longer ago than the
   policy allows), a task kind the node does not know or the policy does not allow, a study
   the Trust did not approve (unless the policy is exploratory), a task whose study hash does
   not match the studies it carries, and tasks beyond the most rounds per study or studies
   per day;
2. runs the handler registered for the kind, which returns a `disclosure.Release`: a
   declaration of everything it wants to release (a handler cannot build the reply itself;
   a bare `Reply` carrying payload or arrays is refused: fail closed);
3. runs the policy over the declaration (model rules, probing defences, the subset rule
   against every row set released before) and rounds/suppresses the count tables;
4. writes the audit entry (the exact release, or the refusal or error) and only then replies.

Any failure becomes a reply with a code and a sentence free of data values; the detail (with
traceback) goes to the node's local log only. A new task kind registers with
`@handler(kind, studies=...)` and so cannot bypass the policy, the audit log or the error
shield. `studies="payload"`: the task carries its studies as wire specs in
`payload["models"]` (approval is checked on their hashes); `"prepared"`: it continues a study
this node prepared (same approval); `"none"`: it computes on no rows, so it may release only
public strings (node/registry.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time

import numpy as np

from ..protocol import messages as m
from ..protocol.errors import DataError, IaptnetError, SpecError
from ..protocol.formula_check import log_exception
from ..protocol.kinds.glm import MAX_MODELS, batch_hash
from ..protocol.study import StudySpec, approval_hash
from . import disclosure as d
from .audit import arrays_for_log, canonical, digest_parameters, now_iso
from .cohort import recording_conditions
from .registry import load_kinds
from .runtime import NodeRuntime

log = logging.getLogger("iaptnet.node")

CLOCK_SKEW = 300.0  # seconds a task may appear to come from the future
_TASK_ID = re.compile(r"^[0-9a-f]{16,64}$")
_TASK_RULES = d.TASK_RULES


def dispatch(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    with runtime.task_lock:
        return _dispatch(runtime, task)


def _dispatch(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    now = time.time()
    try:
        policy = runtime.policy
    except SpecError as exc:
        log.error("node %s cannot load its policy: %s", runtime.name, exc)
        return _reply_error(runtime, task, "policy_invalid", f"this node's policy file is not valid: {exc}")
    record = {
        "time": now_iso(now),
        "node": runtime.name,
        "task_id": _safe(task.task_id, 64),
        "kind": _safe(task.kind),
        "study_hash": _safe(task.study_hash, 64),
        "round": int(task.round),
        "params": digest_parameters(task.payload, task.arrays),
    }
    try:
        rules, fresh_study, repeat = _gate(runtime, policy, task, now, record["params"])
        registration = load_kinds()[task.kind]
        if registration.studies != "none":
            _load_dataset(runtime)
        token, withheld = _TASK_RULES.set(rules), [False]
        withheld_token = d.TASK_WITHHELD.set(withheld)
        try:
            with recording_conditions() as conditions:
                release = registration.fn(runtime, task)
        finally:
            _TASK_RULES.reset(token)
            d.TASK_WITHHELD.reset(withheld_token)
        release = _as_release(release)
        if registration.studies == "none" and release.sections:
            raise d.Refusal(d.Violation("undeclared", "a task kind that reads no rows tried to release statistics"))
        if not release.sections:
            conditions = []  # nothing released: nothing to remember either
        footprints = _judge(runtime, release, rules, conditions)
        payload, arrays = d.finish(release, rules)
    except d.Refusal as refusal:
        return _refused(runtime, task, record, refusal)
    except SpecError as exc:
        # The study itself is not acceptable here (e.g. a formula or filter that fails the
        # node's own checks): a refusal, in the SpecError's own words (no data values).
        return _refused(
            runtime, task, record, d.Refusal(d.Violation("invalid_study", f"the study is not valid here: {exc}"))
        )
    except DataError as exc:
        # A statistic that cannot be computed on the rows (handlers judge the size rule
        # before computing, so this is never about a cohort of a few): told in the same form
        # as a refusal, in our own words (written never to carry data values).
        log.info("task %s (%s) could not be computed: %s", task.task_id, task.kind, exc)
        return _refused(runtime, task, record, d.Refusal(d.Violation("cannot_compute", str(exc))))
    except (np.linalg.LinAlgError, FloatingPointError, OverflowError, ZeroDivisionError):
        # Numerical failure on the rows (after the size rule): the same form as a refusal,
        # and never the library's words.
        log_exception(log, "task %s (%s) could not be computed", task.task_id, task.kind)
        return _refused(
            runtime,
            task,
            record,
            d.Refusal(
                d.Violation("cannot_compute", "a statistic of this study cannot be computed on this node's rows")
            ),
        )
    except IaptnetError as exc:
        # Our own errors are written never to carry data values.
        log.info("task %s (%s) failed: %s", task.task_id, task.kind, exc)
        code = "DataError" if isinstance(exc, Unserviceable) else type(exc).__name__
        return _failed(runtime, task, record, code, str(exc))
    except Exception:  # noqa: BLE001 - anything else may carry values: log here, say little
        log_exception(log, "task %s (%s) failed with an internal error", task.task_id, task.kind)
        return _failed(
            runtime,
            task,
            record,
            "internal_error",
            "the node hit an internal error; the detail is in the node's own log.",
        )
    try:
        if footprints or conditions:
            dataset = runtime.dataset
            with runtime.memory.transaction() as memory:
                memory.remember_release(
                    footprints, dataset.data_version, dataset.n_rows, rules, span=_in_span(_distinct_facts(release))
                )
                memory.remember_conditions(conditions, dataset.data_version, dataset.n_rows, rules)
        for fn in release.on_commit:
            fn()
        released = {"payload": payload, "arrays": arrays_for_log(arrays)}
        if repeat is not None or withheld[0]:
            with runtime.memory.transaction() as memory:
                if repeat is not None:
                    memory.remember_answer(repeat, now)
                if withheld[0]:  # a gap the differencing audit made answers like a refusal...
                    # ...unless the same question got this very answer before: it says nothing new
                    answer = None if repeat is None else _answer_key(repeat, released)
                    if answer is None or not memory.answered_before(answer, now):
                        memory.count_refusal(now)
                        if answer is not None:
                            memory.remember_answer(answer, now)
        entry = runtime.audit.append({**record, "status": m.OK, "released": released})
    except Exception:  # noqa: BLE001
        log_exception(log, "task %s: the audit log could not be written; nothing was released", task.task_id)
        return _reply_error(
            runtime,
            task,
            "audit_failed",
            "the node could not write its audit log, so it released nothing; its operator has the detail.",
        )
    for fn in release.on_release:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the reply stands; a later task will say what is missing
            log_exception(log, "task %s: a step after the release failed", task.task_id)
    if fresh_study is not None:
        runtime.approvals[task.study_hash] = fresh_study
    # The operator's view of activity (node log): what was answered, never a value.
    log.info(
        "node %s answered %s (study %s, round %d): %d arrays released, audit entry %d",
        runtime.name,
        record["kind"],
        record["study_hash"][:12],
        record["round"],
        len(arrays),
        entry["seq"],
    )
    return m.Reply(
        status=m.OK,
        node=runtime.name,
        payload=payload,
        arrays=arrays,
        task_id=task.task_id,
        audit_hash=entry["hash"],
        audit_seq=entry["seq"],
    )


def _answer_key(repeat: str, released: dict) -> str:
    """Names one answer (the release, as the audit log records it) to one question (`repeat`:
    a task's kind, study, parameters and data version)."""
    return hashlib.sha256(f"withheld|{repeat}|{canonical(released)}".encode()).hexdigest()


class Unserviceable(IaptnetError):
    """The node cannot serve its data (broken schema or extract): the operator's error."""


def _load_dataset(runtime: NodeRuntime) -> None:
    """Load the node's data before the handler, so that a broken schema or extract is the
    operator's error, not a refusal of the study."""
    try:
        runtime.dataset  # noqa: B018 - loads and validates it
    except SpecError as exc:
        raise Unserviceable(f"this node cannot serve its data: {exc}") from None
    except DataError as exc:
        raise Unserviceable(str(exc)) from None


# --------------------------------------------------------------------------- the gate


def _gate(runtime: NodeRuntime, policy, task: m.Task, now: float, params: str):
    """Refuse what may not run at all; returns (rules, approval to remember or None, the
    task's repeat key or None). A task the node has answered before on the same data (same
    kind, study and parameters) releases nothing new: it does not count towards the daily
    limits (a demo run twice in a day is answered twice)."""
    if not isinstance(task.task_id, str) or not _TASK_ID.match(task.task_id):
        raise d.Refusal(d.Violation("task_id", "the task has no valid id"))
    with runtime.memory.transaction() as memory:
        if memory.seen_task(task.task_id):
            raise d.Refusal(d.Violation("replay", "the task was answered before (a replayed task)"))
        age = now - float(task.issued_at)
        if not age <= policy.max_task_age_seconds:
            raise d.Refusal(
                d.Violation(
                    "max_task_age",
                    "the task was issued too long ago (a replayed or delayed task)",
                    int(policy.max_task_age_seconds // 60),
                )
            )
        if age < -CLOCK_SKEW:
            raise d.Refusal(
                d.Violation("max_task_age", "the task claims to be issued in the future; check the coordinator's clock")
            )
        memory.remember_task(task.task_id, float(task.issued_at), now, policy.max_task_age_seconds)
        registration = load_kinds().get(task.kind)
        if registration is None:
            raise d.Refusal(d.Violation("task_kind", f"this node does not know the task kind '{_safe(task.kind)}'"))
        if not policy.allows_kind(task.kind):
            raise d.Refusal(
                d.Violation("task_kind", f"this node's policy does not allow the task kind '{_safe(task.kind)}'")
            )
        fresh = None
        if registration.studies == "payload":
            approved = _approval(policy, task)
            fresh = approved
        elif registration.studies == "prepared":
            if task.study_hash not in runtime.prepared or task.study_hash not in runtime.approvals:
                raise d.Refusal(
                    d.Violation(
                        "not_prepared",
                        "this node has not prepared the study (it may have restarted); start the study again",
                    )
                )
            approved = runtime.approvals[task.study_hash]
        else:
            approved = False
        rules = policy.rules_for(approved)
        if memory.refusals_today(now) >= rules.max_refusals_per_day:
            raise d.Refusal(
                d.Violation(
                    "max_refusals_per_day",
                    "this node has refused as many tasks on its data today as its policy allows "
                    "(each such refusal answers a yes/no question about its rows); it answers "
                    "again tomorrow (UTC)",
                    rules.max_refusals_per_day,
                )
            )
        repeat = None
        if registration.studies != "none":
            _load_dataset(runtime)
            repeat = hashlib.sha256(
                f"{task.kind}|{task.study_hash}|{params}|{runtime.dataset.data_version}".encode()
            ).hexdigest()
            if memory.answered_before(repeat, now):
                return rules, fresh, repeat
            done = memory.tasks_today(task.study_hash, now)
            if done >= rules.max_rounds_per_study:
                raise d.Refusal(
                    d.Violation(
                        "max_rounds_per_study",
                        "the study has had as many tasks today as this node answers",
                        rules.max_rounds_per_study,
                    )
                )
            if done == 0 and memory.studies_today(now) >= rules.max_studies_per_day:
                raise d.Refusal(
                    d.Violation(
                        "max_studies_per_day",
                        "this node has answered as many studies today as its policy allows",
                        rules.max_studies_per_day,
                    )
                )
            memory.count_task(task.study_hash, now)
    return rules, fresh, repeat


def _approval(policy, task: m.Task) -> bool:
    models = task.payload.get("models")
    if not isinstance(models, dict) or not models:
        raise d.Refusal(d.Violation("invalid_study", "the task carries no study"))
    if len(models) > MAX_MODELS:
        raise d.Refusal(d.Violation("invalid_study", f"the task carries more than {MAX_MODELS} models"))
    hashes, names, approvals = [], [], []
    for key in sorted(models, key=lambda k: (len(str(k)), str(k))):
        spec = models[key]
        if not isinstance(spec, dict):
            raise d.Refusal(d.Violation("invalid_study", "the task's study is not a table"))
        parsed = StudySpec.from_wire(spec)  # SpecError: refused as an invalid study
        hashes.append(parsed.hash)
        names.append(parsed.name)
        approvals.append(approval_hash(parsed))  # a derived model: its study's hash, checked
    if task.study_hash != batch_hash(hashes):
        raise d.Refusal(d.Violation("study_hash", "the task's study hash does not match the studies it carries"))
    unapproved = [(n, h) for n, h in zip(names, approvals) if not policy.is_approved(h)]
    if unapproved and policy.mode == "approved":
        listed = ", ".join(f"'{_safe(n)}' ({h[:12]})" for n, h in unapproved[:3])
        raise d.Refusal(
            d.Violation(
                "not_approved",
                f"the Trust has not approved the study {listed}",
                fix="ask the Trust to review it with 'iaptnet node approve STUDY.toml'",
            )
        )
    return not unapproved


# --------------------------------------------------------------------------- the policy


def _as_release(result) -> d.Release:
    if isinstance(result, d.Release):
        return result
    if isinstance(result, m.Reply) and not result.payload and not result.arrays and result.status == m.OK:
        return d.Release()
    raise d.Refusal(d.Violation("undeclared", "the task's handler returned statistics it did not declare"))


def _judge(runtime: NodeRuntime, release: d.Release, rules, conditions=()) -> list:
    """Every rule over the declaration, in stages; returns the footprints to remember if it
    passes. Each stage refuses alone, so that a refusal never says more than its own rule:
    first the size rule (one identical reply for 0 rows and for a few), then the cohort
    filters' conditions (each judged on one column of the whole dataset, so the decision says
    nothing about other columns), then the model and round rules, then whether every number can
    be released (finite), then the differencing audit against everything the node released
    before on this data."""
    violations = d.check_declaration(release)
    if violations:
        raise d.Refusal(violations)
    facts = _distinct_facts(release)
    size = [v for f in facts for v in d.check_size(f, rules)]
    if size:
        raise d.Refusal(_dedupe(size))
    if conditions:
        dataset = runtime.dataset
        if any(rows.shape != (dataset.n_rows,) for _, rows in conditions):
            raise RuntimeError("a cohort was evaluated on other rows than the dataset's")
        with runtime.memory.transaction() as memory:
            violations = memory.audit_conditions(conditions, dataset.data_version, dataset.n_rows, rules)
        if violations:
            raise d.Refusal(violations[:1])
    for section in release.sections:
        if section.kind == "round" or section.weights:  # a node's own fit is judged as a round
            violations += d.check_round(section, rules)
    for f in facts:
        if (
            f.parameters is not None
            or f.levels
            or f.max_leverage is not None
            or f.events is not None
            or f.weights is not None
            or f.offset is not None
        ):
            violations += d.check_model(f, rules)
    if violations:
        raise d.Refusal(_dedupe(violations))
    if not d.all_finite(release, rules):
        raise d.Refusal(
            d.Violation(
                "not_finite",
                "a statistic of this release is not a finite number on this node's rows, so it is not released",
            )
        )
    footprints = [f.footprint() for f in facts if f.n_rows]
    if footprints:
        dataset = runtime.dataset
        with runtime.memory.transaction() as memory:
            violations = memory.audit_release(footprints, dataset.data_version, dataset.n_rows, rules)
            if not violations:
                violations = memory.audit_span(_in_span(facts), dataset.data_version, dataset.n_rows, rules)
        if violations:
            raise d.Refusal(_dedupe(violations)[:1])
    return footprints


def _in_span(facts: list[d.ModelFacts]) -> list:
    """The footprints that join the span of released columns (node/span.py; it reuses its
    audit when the release is remembered with the same columns)."""
    return [f.footprint() for f in facts if f.n_rows and f.span]


def _distinct_facts(release: d.Release) -> list[d.ModelFacts]:
    out, seen = [], set()
    for section in release.sections:
        if section.kind in ("model", "table") and section.facts is not None and id(section.facts) not in seen:
            seen.add(id(section.facts))
            out.append(section.facts)
    return out


def _dedupe(violations: list[d.Violation]) -> list[d.Violation]:
    out, seen = [], set()
    for v in violations:
        key = (v.rule, v.sentence, v.model)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


# --------------------------------------------------------------------------- replies

#: Refusals that depend on the node's rows: each tells the analyst something (a cohort is small,
#: two cohorts differ by a few people), so the policy caps how many a day (max_refusals_per_day).
DATA_RULES = frozenset(
    {
        "min_rows",
        "min_events",
        "min_level_count",
        "max_leverage",
        "max_params_per_row",
        "min_subset_difference",
        "min_effective_rows",
        "cannot_compute",
        "not_finite",
        "prior_weights",
        "offset",
        "cr2_covariance",
        "cr2_cluster_alone",
    }
)


def _refused(runtime: NodeRuntime, task: m.Task, record: dict, refusal: d.Refusal) -> m.Reply:
    if any(v.rule in DATA_RULES for v in refusal.violations):
        try:
            with runtime.memory.transaction() as memory:
                memory.count_refusal(time.time())
        except Exception:  # noqa: BLE001 - the refusal stands; the count is best effort
            log_exception(log, "the node could not count a refusal")
    refusals = [v.as_dict() for v in refusal.violations]
    message = "; ".join(v.render() for v in refusal.violations[:6])
    if len(refusal.violations) > 6:
        message += f"; and {len(refusal.violations) - 6} more"
    entry = _audit(runtime, {**record, "status": m.REFUSED, "code": refusal.rule, "refusal": refusals})
    log.info(
        "node %s refused %s (study %s, round %d): %s",
        runtime.name,
        record["kind"],
        record["study_hash"][:12],
        record["round"],
        message,
    )
    if entry is None:
        return _reply_error(
            runtime, task, "audit_failed", "the node could not write its audit log; its operator has the detail."
        )
    return m.Reply(
        status=m.REFUSED,
        node=runtime.name,
        code=refusal.rule,
        message=message,
        payload={"refusals": refusals},
        task_id=_safe(task.task_id, 64),
        audit_hash=entry["hash"],
        audit_seq=entry["seq"],
    )


def _failed(runtime: NodeRuntime, task: m.Task, record: dict, code: str, message: str) -> m.Reply:
    entry = _audit(runtime, {**record, "status": m.ERROR, "code": code, "error": message})
    reply = _reply_error(runtime, task, code, message)
    if entry is not None:
        reply.audit_hash, reply.audit_seq = entry["hash"], entry["seq"]
    return reply


def _audit(runtime: NodeRuntime, fields: dict) -> dict | None:
    """The entry written (its seq and hash are the node's audit head), or None."""
    try:
        return runtime.audit.append(fields)
    except Exception:  # noqa: BLE001
        log_exception(log, "the audit log could not be written")
        return None


def _reply_error(runtime: NodeRuntime, task: m.Task, code: str, message: str) -> m.Reply:
    return m.Reply(status=m.ERROR, node=runtime.name, code=code, message=message, task_id=_safe(task.task_id, 64))


def refuse_undecoded(runtime: NodeRuntime, kind: str, task_id: str, violation: d.Violation) -> m.Reply:
    """A refusal for a message that was not decoded (e.g. too large), audited like any task."""
    record = {
        "time": now_iso(time.time()),
        "node": runtime.name,
        "task_id": _safe(task_id, 64),
        "kind": _safe(kind),
        "study_hash": "",
        "round": 0,
        "params": "",
    }
    task = m.Task(kind=_safe(kind), study_hash="", task_id=_safe(task_id, 64))
    return _refused(runtime, task, record, d.Refusal(violation))


def _safe(text, limit: int = 60) -> str:
    return "".join(ch for ch in str(text)[:limit] if ch.isprintable())
