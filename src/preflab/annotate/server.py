"""Run the app with uvicorn on loopback; a public address needs an explicit opt-in."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from preflab.errors import PreflabError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_host(host: str, allow_public: bool) -> None:
    if not is_loopback(host) and not allow_public:
        raise PreflabError(
            f"refusing to listen on {host!r}: that is not a loopback address, so anyone who can reach this "
            "machine could try tokens over plain HTTP. Put a TLS proxy in front and pass --allow-public, "
            "or keep the default --host 127.0.0.1")


def serve(store_path: str | Path, project: str | None = None, *, host: str = "127.0.0.1", port: int = 8765,
          allow_public: bool = False, log_level: str = "warning") -> None:
    """Serve one project until interrupted (one process: the store has one writer at a time)."""
    check_host(host, allow_public)
    import uvicorn

    from preflab.annotate.app import create_app

    app = create_app(store_path, project)
    print(f"preflab annotate: project {app.state.project.name!r} at http://{host}:{port}/ "
          f"(admin: http://{host}:{port}/admin); Ctrl+C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, server_header=False)
