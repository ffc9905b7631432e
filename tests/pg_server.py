"""A throwaway PostgreSQL server for the tests of the store's PostgreSQL back end.

``initdb`` and ``postgres`` from ``$PREFLAB_PG_BIN``, ``pg_config --bindir``, the newest
``/usr/lib/postgresql/*/bin`` or ``PATH``, run in a new temporary folder, listening on
127.0.0.1 at a free port (trust authentication, no fsync: nothing here outlives the tests).
PostgreSQL refuses to run as root, so under root they run as ``nobody``. ``start_or_skip``
skips the test, with one message, where the binaries, psycopg or the server are missing.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "preflab"  # the database superuser initdb makes


def _bin_dir() -> Path | None:
    dirs = [os.environ.get("PREFLAB_PG_BIN", "")]
    if shutil.which("pg_config"):
        dirs.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    if shutil.which("initdb"):
        dirs.append(str(Path(shutil.which("initdb")).parent))
    return next((Path(d) for d in dirs if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file()),
                None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        nobody = pwd.getpwnam("nobody") if os.geteuid() == 0 else None  # postgres will not run as root
        self.root = Path(tempfile.mkdtemp(prefix="preflab-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._names = itertools.count()
        self.as_user: list[str] = []
        if nobody is not None:
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self.as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        got = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        if got.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} exited with {got.returncode}: {(got.stderr or got.stdout)[-500:]}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        for _ in range(3):  # another process may take the free port first
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                    "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
                          "-w", "-t", "60", "start", timeout=90)
                return
            except RuntimeError:
                continue
        raise RuntimeError(f"the server did not start; see {self.root / 'log'}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A new empty database; its postgresql:// URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.data.is_dir():
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_or_skip() -> PgServer:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests: psycopg is not installed (pip install -e '.[postgres]')")
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL tests: no initdb/pg_ctl found (install PostgreSQL or set PREFLAB_PG_BIN)")
    server = None
    try:
        server = PgServer(bin_dir)
        server.start()
    except (RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as e:
        if server is not None:
            server.stop()
        pytest.skip(f"PostgreSQL tests: the server could not start ({type(e).__name__}: {e})")
    return server
