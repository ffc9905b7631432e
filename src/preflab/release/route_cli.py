"""``preflab route start | rollback | promote | shares | status``: the router's command line."""

from __future__ import annotations

import json

import click

from preflab.errors import PreflabError
from preflab.release.common import (
    check_bind,
)
from preflab.release.route import (
    load_config,
)
from preflab.release.route_app import build_app

# ---------------------------------------------------------------------------------------------
# preflab route
# ---------------------------------------------------------------------------------------------


@click.group("route")
def cli() -> None:
    """Canary router in front of OpenAI-compatible back ends (start), and its admin commands.

    \b
    Examples:
      preflab route start --config route.yaml --port 8000 --admin-token "$ADMIN"
      preflab route rollback --url http://127.0.0.1:8000      # every candidate to share 0
      preflab route promote cand --url http://127.0.0.1:8000  # cand becomes the incumbent
      preflab route shares cand=0.05 --url http://127.0.0.1:8000
      preflab route status --url http://127.0.0.1:8000
    The admin commands read the token from --admin-token or PREFLAB_ROUTE_ADMIN_TOKEN.
    """


@cli.command("start")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--allow-public", is_flag=True, help="Allow a --host that is not a loopback address.")
@click.option("--admin-token", envvar="PREFLAB_ROUTE_ADMIN_TOKEN", default=None,
              help="Token of the /admin endpoints (env PREFLAB_ROUTE_ADMIN_TOKEN); without it they are off.")
@click.option("--token", envvar="PREFLAB_ROUTE_TOKEN", default=None, help="Bearer token clients must send.")
def start(config_path, host, port, allow_public, admin_token, token):
    """Run the router.

    Example: preflab route start --config route.yaml --port 8000 --admin-token "$ADMIN"
    """
    import uvicorn

    check_bind(host, allow_public)
    cfg = load_config(config_path)
    app = build_app(cfg, admin_token=admin_token, token=token)  # reads the state file: a bad one stops here
    click.echo(f"routing {cfg.model!r} on http://{host}:{port} to {', '.join(b.name for b in cfg.backends)}",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _admin(url: str, token: str | None, method: str, path: str, body: dict | None = None) -> dict:
    import httpx

    if not token:
        raise PreflabError("the admin commands need --admin-token (or PREFLAB_ROUTE_ADMIN_TOKEN)")
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, timeout=30,
                          headers={"authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        raise PreflabError(f"{url}: cannot reach the router ({e})") from None
    if r.status_code != 200:
        raise PreflabError(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


_url = click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The router.")
_token = click.option("--admin-token", envvar="PREFLAB_ROUTE_ADMIN_TOKEN", default=None)


@cli.command("rollback")
@click.argument("backends", nargs=-1)
@click.option("--reason", default="by hand")
@_url
@_token
def rollback_cmd(backends, reason, url, admin_token):
    """Set the candidates' share (all, or BACKENDS) to 0.

    Example: preflab route rollback --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/rollback",
                                 {"backends": list(backends) or None, "reason": reason})))


@cli.command("promote")
@click.argument("backend")
@click.option("--reason", default="by hand")
@_url
@_token
def promote_cmd(backend, reason, url, admin_token):
    """Make BACKEND the incumbent (every other share 0).

    Example: preflab route promote cand --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/promote", {"backend": backend, "reason": reason})))


@cli.command("shares")
@click.argument("pairs", nargs=-1, required=True)
@_url
@_token
def shares_cmd(pairs, url, admin_token):
    """Set shares: NAME=SHARE ... (e.g. cand=0.05).

    Example: preflab route shares cand=0.05 --admin-token "$ADMIN"
    """
    shares = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        try:
            shares[name] = float(value) if sep else float("nan")
        except ValueError:
            shares[name] = float("nan")
        if shares[name] != shares[name]:
            raise PreflabError(f"{p!r}: expected NAME=SHARE, e.g. cand=0.05")
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/shares", {"shares": shares})))


@cli.command("status")
@_url
@_token
def status_cmd(url, admin_token):
    """Shares, incumbent and the canary metrics of every back end.

    Example: preflab route status --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "GET", "/admin/state"), indent=2))
