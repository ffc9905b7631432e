"""Feedback -> labeling tasks (issue 27, item 12): only negative feedback is linked to the task made
for an exchange; a thumbs-up on the same exchange, before or after, stays unlinked."""

import sqlite3

import httpx

from helpers import wait_for
from preflab.release.fake import ThreadServer, fake_backend
from preflab.release.route import RouteConfig
from preflab.release.route_app import build_app


def test_a_thumbs_up_is_not_linked_to_the_thumbs_downs_task(tmp_path):
    with ThreadServer(fake_backend("prod")) as inc, ThreadServer(fake_backend("cand")) as cand:
        cfg = RouteConfig.model_validate({
            "store": str(tmp_path / "store.sqlite"), "model": "preflab",
            "backends": [{"name": "prod", "url": inc.url, "model": "prod", "role": "incumbent"},
                         {"name": "cand", "url": cand.url, "model": "cand", "share": 0.0}]})
        db = sqlite3.connect(cfg.store)
        db.row_factory = sqlite3.Row

        def rows():
            return {r["id"]: r["task_id"] for r in db.execute("SELECT id, task_id FROM route_feedback")}

        with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
            xid = c.post("/v1/chat/completions", json={"model": "preflab", "user": "u1",
                                                       "messages": [{"role": "user", "content": "hi"}]}).json()["id"]

            def feedback(fid, thumbs):
                r = c.post("/v1/feedback", json={"id": xid, "thumbs": thumbs, "feedback_id": fid})
                assert r.status_code == 200, r.text

            feedback("up-before", "up")
            feedback("down-1", "down")
            assert wait_for(lambda: rows()["down-1"] is not None, 20.0)
            task = rows()["down-1"]
            feedback("up-after", "up")
            feedback("down-2", "down")  # a second thumbs-down of the exchange joins its task
            assert wait_for(lambda: rows()["down-2"] is not None, 20.0)
    assert rows() == {"up-before": None, "down-1": task, "up-after": None, "down-2": task}
    assert db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 1
