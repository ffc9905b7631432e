"""The annotation app's own tables, kept in the preference store (its SQLite file or PostgreSQL database).

They sit beside the store's tables (prompts, candidates, rankings, queue) and reference
them; created with ``CREATE TABLE IF NOT EXISTS`` on first use, so a store made before the
app existed gains them when a project is created and nothing else changes. Rankings,
tasks and prompts stay in the store's own tables: `preflab rm` needs no conversion.
"""

from __future__ import annotations

from datetime import UTC, datetime

from preflab.feedback.store import PreferenceStore

TABLES = (
    """CREATE TABLE IF NOT EXISTS annotate_accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('labeler', 'admin')),
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS annotate_projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL UNIQUE,
        k INTEGER NOT NULL,
        split TEXT,
        guidelines TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL)""",
    # gold: the known answer of a gold task (never sent to labelers); positions index candidate_ids
    """CREATE TABLE IF NOT EXISTS annotate_gold (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES annotate_projects(id),
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        candidate_ids TEXT NOT NULL,
        "order" TEXT,
        required_flags TEXT NOT NULL DEFAULT '{}',
        UNIQUE (project_id, prompt_id))""",
    """CREATE TABLE IF NOT EXISTS annotate_skips (
        task_id INTEGER NOT NULL REFERENCES queue(id),
        labeler TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (task_id, labeler))""",
    """CREATE TABLE IF NOT EXISTS annotate_adjudications (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES annotate_projects(id),
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        candidate_ids TEXT NOT NULL,
        ranking_id INTEGER NOT NULL REFERENCES rankings(id),
        admin TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (project_id, prompt_id, candidate_ids))""",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def ensure_tables(store: PreferenceStore) -> None:
    """Create the app's tables if the store lacks them (idempotent, one transaction)."""
    with store.transaction() as c:
        for sql in TABLES:
            c.execute(sql)


def has_tables(store: PreferenceStore) -> bool:
    return store.has_table("annotate_projects")
