"""The release loop: gate a candidate on prompt replay, serve a model behind an OpenAI-compatible
API, route a canary share of traffic to it with feedback and rollback, and pack a run for
reproduction.

``serve.py`` (``preflab serve``), ``gate.py`` (``preflab gate``), ``route.py`` (``preflab route``: the router's core; its app in ``route_app.py``, its commands in ``route_cli.py``),
``repro.py`` (``preflab repro``); ``common.py`` holds what they share (OpenAI-style errors, the
loopback rule, model hashes). See docs/release.md.
"""
