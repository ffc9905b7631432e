"""A labeler's work: take the next task, submit a ranking, or skip.

Candidates are shown in an order shuffled per (labeler, task), so position bias spreads
over candidates; submissions come back in display positions and are mapped to the task's
candidate order before they reach the store. ``submit`` is idempotent: sending the same
ranking of a task again returns the stored ranking's id and writes nothing; the same order with
other scores, flags or note is a correction, written over the stored ones (``updated``); another
order is refused (409).
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

from preflab.annotate.db import now
from preflab.annotate.project import Project
from preflab.annotate.validate import Invalid, parse_submission
from preflab.feedback.labelers import stable_seed
from preflab.feedback.store import PreferenceStore

# A task of a prompt the labeler skipped is not offered to them again (store.next_task's ``where``).
NOT_SKIPPED = ("AND NOT EXISTS (SELECT 1 FROM annotate_skips s JOIN queue o ON o.id = s.task_id "
               "WHERE s.labeler = ? AND o.queue = q.queue AND o.prompt_id = q.prompt_id)")


class Submitted(NamedTuple):
    """What ``submit`` did: the ranking's id; ``duplicate``: the task's ranking was stored before (no
    new ranking); ``updated``: this submission changed that ranking's scores, flags or note."""

    ranking_id: int
    duplicate: bool
    updated: bool = False


def display_order(project: Project, labeler: str, task_id: int, k: int) -> list[int]:
    """``perm[d]`` = the task position shown at display position d (fixed per labeler and task)."""
    perm = list(range(k))
    random.Random(stable_seed("annotate-shuffle", project.name, labeler, task_id)).shuffle(perm)
    return perm


def next_task(store: PreferenceStore, project: Project, labeler: str) -> dict[str, Any] | None:
    """Assign the labeler a task and return what they may see, or None when none is left.

    A task they hold comes back first (a reload resumes it); otherwise the oldest pending task
    of a prompt they have neither been given nor skipped. Atomic: a task goes to one labeler.
    """
    task = store.next_task(labeler, project.queue, where=NOT_SKIPPED, where_args=(labeler,))
    if task is None:
        return None
    perm = display_order(project, labeler, task.id, len(task.candidates))
    return {"task_id": task.id, "prompt": task.prompt, "k": len(perm),
            "responses": [task.candidates[p] for p in perm]}


def _own_task(store: PreferenceStore, project: Project, labeler: str, task_id: int) -> Any:
    """The queue row of a task of this project that is (or was) this labeler's; else Invalid."""
    rows = store.query("SELECT * FROM queue WHERE id = ?", (task_id,))
    if not rows or rows[0]["queue"] != project.queue:
        raise Invalid("task_id", f"unknown task {task_id}", 404)
    if rows[0]["labeler"] != labeler:
        raise Invalid("task_id", f"task {task_id} is not assigned to you", 403)
    return rows[0]


def submit(store: PreferenceStore, project: Project, labeler: str, task_id: int, body: Any) -> Submitted:
    """Store the labeler's ranking of a task (see ``Submitted``). A task already submitted takes the
    same order again, with its scores, flags and note replacing the stored ones (``_resubmit``).

    Raises Invalid (nothing written) for an unknown task (404), another labeler's task (403),
    a different ranking of a task already submitted (409), or a bad body (400/422).
    """
    row = _own_task(store, project, labeler, task_id)
    k = len(json.loads(row["candidate_ids"]))
    sub = parse_submission(body, k)
    perm = display_order(project, labeler, task_id, k)
    order = [sorted(perm[d] for d in tier) for tier in sub.order]  # best first, as task positions
    scores: list[int | None] = [None] * k
    flags: list[list[str]] = [[] for _ in range(k)]
    for d, p in enumerate(perm):
        scores[p], flags[p] = sub.scores[d], sub.flags[d]
    answers = {"scores": scores, "response_flags": flags, "note": sub.note}
    union = sorted({f for fl in flags for f in fl})
    with store.transaction(exclusive=False) as c:  # the task's row is locked: one submission at a time
        row = c.execute(f"SELECT status, labeler, ranking_id FROM queue WHERE id = ?{store.dialect.for_update}",
                        (task_id,)).fetchone()
        if row["labeler"] != labeler:
            raise Invalid("task_id", f"task {task_id} is not assigned to you", 403)
        if row["status"] == "done":
            return _resubmit(c, task_id, int(row["ranking_id"]), order, answers, union)
        meta = {"project": project.name, "source": "annotate", **answers, "display": perm}
        return Submitted(store.complete(task_id, order, labeler, time_s=sub.time_s, flags=union, meta=meta), False)


def _resubmit(c: Any, task_id: int, ranking_id: int, order: list[list[int]],
              answers: dict[str, Any], flags: list[str]) -> Submitted:
    """A submitted task sent again: the same order with the same answers writes nothing; with other
    scores, flags or note it updates the stored ranking (its time_s stays the first submission's,
    ``meta.updated_at`` says when); another order is 409."""
    got = c.execute('SELECT "order", meta FROM rankings WHERE id = ?', (ranking_id,)).fetchone()
    if json.loads(got["order"]) != order:
        raise Invalid("task_id", f"task {task_id} was already submitted with a different ranking", 409)
    meta = json.loads(got["meta"])
    if all(meta.get(key) == value for key, value in answers.items()):
        return Submitted(ranking_id, True)
    meta.update(answers, updated_at=now())
    c.execute("UPDATE rankings SET flags = ?, meta = ? WHERE id = ?", (json.dumps(flags), json.dumps(meta), ranking_id))
    return Submitted(ranking_id, True, True)


def skip(store: PreferenceStore, project: Project, labeler: str, task_id: int) -> None:
    """Give a task back: it goes to another labeler, and this one is not offered its prompt again."""
    rows = store.query("SELECT 1 FROM annotate_skips WHERE task_id = ? AND labeler = ?", (task_id, labeler))
    if rows:
        return  # already skipped: idempotent
    row = _own_task(store, project, labeler, task_id)
    if row["status"] == "done":
        raise Invalid("task_id", f"task {task_id} is already submitted", 409)
    with store.transaction(exclusive=False) as c:  # the UPDATE first: it locks the task's row
        c.execute("UPDATE queue SET status = 'pending', labeler = NULL, assigned_at = NULL "
                  "WHERE id = ? AND status = 'assigned' AND labeler = ?", (task_id, labeler))
        c.execute("INSERT INTO annotate_skips(task_id, labeler, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                  (task_id, labeler, now()))


def done_count(store: PreferenceStore, project: Project, labeler: str) -> int:
    rows = store.query("SELECT COUNT(*) FROM queue WHERE queue = ? AND labeler = ? AND status = 'done'",
                       (project.queue, labeler))
    return int(rows[0][0])
