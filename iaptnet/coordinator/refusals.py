"""Showing a node's refusal to the analyst in plain words.

A node refuses with a structured reply (protocol/messages.py): per broken rule, the rule, its
threshold, the model, term and level concerned and, where there is one, the fix (merge a rare
level, drop a term, widen the cohort). Never a value of the data. Here they become sentences
such as "camden refused: level 'bdd' of problem has fewer than 8 rows; the policy's minimum
is 8 (model 'd5_neet'); to fix: merge it with another level, e.g. [merge.problem] ...".
"""

from __future__ import annotations

from ..protocol import messages as m

MAX_SHOWN = 4


def refusals_of(reply: m.Reply) -> list[dict]:
    """The structured refusals of a reply (an empty list if it carries none we can read)."""
    items = reply.payload.get("refusals") if isinstance(reply.payload, dict) else None
    if not isinstance(items, list):
        return []
    return [r for r in items if isinstance(r, dict)]


def describe(reply: m.Reply) -> str:
    """What follows "<node> refused: " for a refused reply."""
    items = refusals_of(reply)
    if not items:
        text = "".join(ch for ch in reply.message[:600] if ch.isprintable())
        return text or "it gave no reason"
    shown = [m.render_refusal(r) for r in items[:MAX_SHOWN]]
    if len(items) > MAX_SHOWN:
        shown.append(f"and {len(items) - MAX_SHOWN} more")
    return "; ".join(shown)


def sentence(node: str, reply: m.Reply) -> str:
    return f"{node} refused: {describe(reply)}"
