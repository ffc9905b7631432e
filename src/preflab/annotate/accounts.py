"""Labeler and admin accounts. A token is shown once, at creation; the store keeps its SHA-256.

Tokens are 32 random bytes, so a plain hash is enough (no password stretching needed): the
store file alone never lets anyone log in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from preflab.annotate.db import ensure_tables, has_tables, now
from preflab.errors import DataError
from preflab.feedback.store import PreferenceStore

ROLES = ("labeler", "admin")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOKEN_PREFIX = "pfl_"


@dataclass(frozen=True)
class Account:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_account(store: PreferenceStore, name: str, role: str = "labeler") -> str:
    """Add an account; return its token (not stored: only its hash is)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DataError(f"account name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise DataError(f"role must be one of {ROLES}, got {role!r}")
    ensure_tables(store)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.transaction() as c:
        if c.execute("SELECT 1 FROM annotate_accounts WHERE name = ?", (name,)).fetchone():
            raise DataError(f"account {name!r} exists (use `preflab annotate token {name}` for a new token)")
        c.execute("INSERT INTO annotate_accounts(name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
                  (name, role, hash_token(token), now()))
    return token


def new_token(store: PreferenceStore, name: str) -> str:
    """Replace an account's token (the old one stops working); return the new one."""
    ensure_tables(store)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.transaction() as c:
        cur = c.execute("UPDATE annotate_accounts SET token_hash = ? WHERE name = ?", (hash_token(token), name))
        if cur.rowcount != 1:
            raise DataError(f"no account named {name!r}")
    return token


def authenticate(store: PreferenceStore, token: str | None) -> Account | None:
    """The account this token belongs to, or None (no token, malformed, unknown)."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    rows = store.query("SELECT name, role FROM annotate_accounts WHERE token_hash = ?", (hash_token(token),))
    return Account(rows[0]["name"], rows[0]["role"]) if rows else None


def accounts(store: PreferenceStore) -> list[Account]:
    if not has_tables(store):
        return []
    return [Account(r["name"], r["role"]) for r in store.query("SELECT name, role FROM annotate_accounts ORDER BY id")]
