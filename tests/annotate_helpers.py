"""Shared set-up for the annotation app's tests: a small project, accounts, ranking by task position."""

from __future__ import annotations

from preflab.annotate import tasks
from preflab.annotate.accounts import create_account
from preflab.annotate.project import Item, create_project
from preflab.feedback.store import PreferenceStore

GOLD = Item("Which answer is right? 2+2", ["4", "5", "22", "four hundred"], gold_order=[[0], [1], [2], [3]],
            gold_flags={3: ["hallucination"]})


def make_project(path, *, n=6, overlap=1.0, gold=(GOLD,), guidelines="# Rules\n- rank by **helpfulness**"):
    """A project of ``n`` prompts (K=4, slices a/b), every prompt ranked by 3 labelers by default;
    returns (project, {name: token}) with labelers alice, bob, carol and admin boss."""
    items = [Item(f"Prompt number {i}", [f"answer {i}.{j}" for j in range(4)], uid=f"p{i}",
                  slice="a" if i % 2 else "b") for i in range(n)]
    with PreferenceStore(path) as store:
        project = create_project(store, "demo", items, gold=list(gold), overlap=overlap, guidelines=guidelines)
        tokens = {name: create_account(store, name) for name in ("alice", "bob", "carol")}
        tokens["boss"] = create_account(store, "boss", "admin")
    return project, tokens


def body_for(project, labeler, task, order, flags=None, **extra):
    """A submission that ranks the task's candidates in ``order`` (tiers of *task* positions), with
    ``flags`` ({task position: [flag]}), translated to the labeler's display positions."""
    perm = tasks.display_order(project, labeler, task["task_id"], task["k"])
    where = {p: d for d, p in enumerate(perm)}
    body = {"order": [[where[p] for p in tier] for tier in order], **extra}
    if flags:
        body["flags"] = [flags.get(p, []) for p in perm]
    return body


def task_positions(store, task):
    """The task's candidate texts in task (not display) order."""
    return store.task(task["task_id"]).candidates
