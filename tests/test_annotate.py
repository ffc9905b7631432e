"""The annotation app's core without HTTP: projects, accounts, tasks, validation, stats, and the
rankings reaching `preflab rm` through the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from annotate_helpers import GOLD, body_for, make_project, task_positions
from preflab.annotate import tasks
from preflab.annotate.accounts import authenticate, create_account, hash_token, new_token
from preflab.annotate.markdown import render
from preflab.annotate.project import Item, create_project, load_project, parse_item
from preflab.annotate.server import check_host
from preflab.annotate.stats import adjudicate, project_stats
from preflab.annotate.validate import Invalid
from preflab.cli import main
from preflab.errors import DataError, PreflabError
from preflab.feedback.agreement import krippendorff_alpha_ordinal
from preflab.feedback.store import PreferenceStore

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def proj(store_spec):
    """A project in a SQLite store, then in a PostgreSQL one (skipped where PostgreSQL cannot run)."""
    project, tokens = make_project(store_spec)
    with PreferenceStore(store_spec) as store:
        yield store, project, tokens


def test_project_tasks_overlap_and_gold(tmp_path):
    path = tmp_path / "s.sqlite"
    items = [Item(f"q{i}", ["a", "b", "c"]) for i in range(10)]
    gold = Item("g", ["x", "y", "z"], gold_order=[[2], [0, 1]])
    with PreferenceStore(path) as store:
        p = create_project(store, "p1", items, gold=[gold], overlap=0.3, overlap_labelers=3, gold_copies=2)
        assert (p.k, p.queue, p.split) == (3, "annotate:p1", "rm")
        per_prompt = [r[0] for r in store.query(
            "SELECT COUNT(*) FROM queue WHERE queue = ? GROUP BY prompt_id ORDER BY prompt_id", (p.queue,))]
        assert sorted(per_prompt) == [1] * 7 + [2] + [3] * 3  # 7 single, gold x2, 3 overlapped x3
        (g,) = store.query('SELECT "order", candidate_ids FROM annotate_gold')
        assert json.loads(g["order"]) == [[2], [0, 1]] and len(json.loads(g["candidate_ids"])) == 3
        assert {q.split for q in store.prompts()} == {"rm"}


def test_project_creation_is_all_or_nothing(tmp_path):
    with PreferenceStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(DataError, match="same number of responses"):
            create_project(store, "p", [Item("q", ["a", "b"]), Item("r", ["a", "b", "c"])])
        with pytest.raises(DataError, match="duplicate prompt id"):
            create_project(store, "p", [Item("q", ["a", "b"], uid="x"), Item("r", ["a", "b"], uid="x")])
        create_project(store, "p", [Item("q", ["a", "b"])])
        with pytest.raises(DataError, match="exists"):
            create_project(store, "p", [Item("other", ["a", "b"])])
        assert store.counts()["prompts"] == 1 and store.counts()["queue_pending"] == 1
    with pytest.raises(ValueError, match="flags: unknown flag"):
        parse_item({"prompt": "p", "responses": ["a", "b"], "flags": {"0": ["rude"]}}, gold=True)
    with pytest.raises(ValueError, match="needs 'order'"):
        parse_item({"prompt": "p", "responses": ["a", "b"]}, gold=True)


def test_tokens_are_stored_hashed(tmp_path):
    path = tmp_path / "s.sqlite"
    with PreferenceStore(path) as store:
        token = create_account(store, "alice")
        assert authenticate(store, token).name == "alice"
        for wrong in (None, "", token[:-1] + ("A" if token[-1] != "A" else "B"), "nope", token + "x"):
            assert authenticate(store, wrong) is None
        with pytest.raises(DataError, match="exists"):
            create_account(store, "alice")
        with pytest.raises(DataError, match="account name"):
            create_account(store, "adjudicator:x")
        fresh = new_token(store, "alice")
        assert authenticate(store, token) is None and authenticate(store, fresh).role == "labeler"
    conn = sqlite3.connect(path)
    dump = "\n".join(conn.iterdump())
    assert token not in dump and fresh not in dump and hash_token(fresh) in dump


def test_store_query_reads_only(proj):
    store, _, _ = proj
    assert store.query("SELECT COUNT(*) FROM annotate_accounts")[0][0] == 4
    for sql in ("DELETE FROM annotate_accounts", "WITH x AS (SELECT 1) DELETE FROM annotate_accounts"):
        with pytest.raises(DataError, match="SELECT statements only"):
            store.query(sql)
    assert store.query("SELECT COUNT(*) FROM annotate_accounts")[0][0] == 4


def test_shuffled_display_maps_back_to_candidates(proj):
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    texts = task_positions(store, t)
    perm = tasks.display_order(project, "alice", t["task_id"], 4)
    assert t["responses"] == [texts[p] for p in perm] and sorted(perm) == [0, 1, 2, 3]
    assert set(t) == {"task_id", "prompt", "k", "responses"}  # nothing about gold or others
    # the labeler puts display 2 first, ties 0 and 3, display 1 last; scores and flags by display position
    body = {"order": [[2], [0, 3], [1]], "scores": [5, 1, 7, None], "flags": [[], ["hallucination"], [], []],
            "note": "close call", "time_s": 12.5}
    rid, dup, updated = tasks.submit(store, project, "alice", t["task_id"], body)
    (r,) = store.rankings(labeler="alice")
    assert (r.id, dup, updated) == (rid, False, False)
    assert [r.candidates[i] for i in r.order[0]] == [t["responses"][2]]
    assert sorted(r.candidates[i] for i in r.order[1]) == sorted([t["responses"][0], t["responses"][3]])
    assert [r.candidates[i] for i in r.order[2]] == [t["responses"][1]]
    assert r.meta["scores"][perm[2]] == 7 and r.meta["scores"][perm[3]] is None
    assert r.meta["response_flags"][perm[1]] == ["hallucination"] and r.flags == ["hallucination"]
    assert (r.time_s, r.meta["note"], r.meta["display"], r.meta["project"]) == (12.5, "close call", perm, "demo")


def test_double_submit_is_idempotent(proj):
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    body = {"order": [[0], [1], [2], [3]]}
    first = tasks.submit(store, project, "alice", t["task_id"], body)
    assert tasks.submit(store, project, "alice", t["task_id"], body) == (first[0], True, False)
    with pytest.raises(Invalid) as e:
        tasks.submit(store, project, "alice", t["task_id"], {"order": [[3], [2], [1], [0]]})
    assert (e.value.status, e.value.field) == (409, "task_id")
    assert store.counts()["rankings"] == 1


def test_a_corrected_submission_updates_scores_flags_and_note(proj):
    """The same order with new scores, flags or note replaces them (issue 27, item 10)."""
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    first = tasks.submit(store, project, "alice", t["task_id"],
                         {"order": [[0], [1], [2], [3]], "scores": [7, 5, 3, 1], "note": "first", "time_s": 4.0})
    fixed = {"order": [[0], [1], [2], [3]], "scores": [6, 5, 3, 1], "flags": [[], [], ["hallucination"], []],
             "note": "second thoughts", "time_s": 9.0}
    assert tasks.submit(store, project, "alice", t["task_id"], fixed) == (first.ranking_id, True, True)
    (r,) = store.rankings(labeler="alice")
    perm = r.meta["display"]  # display position d showed task position perm[d]
    assert [r.meta["scores"][perm[d]] for d in range(4)] == [6, 5, 3, 1]
    assert r.meta["response_flags"][perm[2]] == ["hallucination"] and r.flags == ["hallucination"]
    assert (r.meta["note"], r.time_s) == ("second thoughts", 4.0) and r.meta["updated_at"]
    assert r.meta["task_id"] == t["task_id"] and r.meta["project"] == "demo"  # the rest of meta kept
    assert tasks.submit(store, project, "alice", t["task_id"], fixed) == (first.ranking_id, True, False)
    assert store.counts()["rankings"] == 1


@pytest.mark.parametrize("body, field, words", [
    ({}, "order", "missing"),
    ({"order": [[0], [1], [2]]}, "order", "missing positions [3]"),
    ({"order": [[0, 1], [1], [2], [3]]}, "order", "ranked twice"),
    ({"order": [[0], [1], [2], [7]]}, "order", "outside 0..3"),
    ({"order": [[0], [], [1, 2, 3]]}, "order", "empty"),
    ({"order": [[0], [1], [2], [3]], "scores": [8, 1, 1, 1]}, "scores[0]", "1-7"),
    ({"order": [[0], [1], [2], [3]], "scores": [1, 1]}, "scores", "4 entries"),
    ({"order": [[0], [1], [2], [3]], "flags": [[], ["rude"], [], []]}, "flags[1]", "unknown flag 'rude'"),
    ({"order": [[0], [1], [2], [3]], "note": "x" * 5000}, "note", "at most 4000"),
    ({"order": [[0], [1], [2], [3]], "time_s": -1}, "time_s", "seconds"),
    ({"order": [[0], [1], [2], [3]], "labeler": "bob"}, "labeler", "unknown field"),
    (["not", "an", "object"], "body", "JSON object"),
])
def test_bad_submission_names_the_field_and_writes_nothing(proj, body, field, words):
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    before = store.counts()
    with pytest.raises(Invalid) as e:
        tasks.submit(store, project, "alice", t["task_id"], body)
    assert e.value.field == field and words in e.value.message and 400 <= e.value.status < 500
    assert store.counts() == before and store.task(t["task_id"]).status == "assigned"


def test_wrong_labeler_and_unknown_task(proj, tmp_path):
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    with pytest.raises(Invalid) as e:
        tasks.submit(store, project, "bob", t["task_id"], {"order": [[0], [1], [2], [3]]})
    assert (e.value.status, e.value.field) == (403, "task_id")
    with pytest.raises(Invalid) as e:
        tasks.submit(store, project, "alice", 10_000, {"order": [[0], [1], [2], [3]]})
    assert e.value.status == 404
    other = create_project(store, "other", [Item("z", ["a", "b", "c", "d"])])
    t2 = tasks.next_task(store, other, "alice")
    with pytest.raises(Invalid) as e:  # a task of another project is unknown here
        tasks.submit(store, project, "alice", t2["task_id"], {"order": [[0], [1], [2], [3]]})
    assert e.value.status == 404 and store.counts()["rankings"] == 0


def test_skip_passes_the_task_on(proj):
    store, project, _ = proj
    t = tasks.next_task(store, project, "alice")
    prompt = t["prompt"]
    tasks.skip(store, project, "alice", t["task_id"])
    tasks.skip(store, project, "alice", t["task_id"])  # idempotent
    assert store.task(t["task_id"]).status == "pending"
    seen = []
    while (nt := tasks.next_task(store, project, "alice")) is not None:
        seen.append(nt["prompt"])
        tasks.submit(store, project, "alice", nt["task_id"], {"order": [[0], [1], [2], [3]]})
    assert prompt not in seen and len(seen) == 6  # 7 prompts (6 + gold), one skipped
    assert tasks.next_task(store, project, "bob")["task_id"] == t["task_id"]
    done = store.rankings(labeler="alice")[0].meta["task_id"]
    with pytest.raises(Invalid) as e:
        tasks.skip(store, project, "alice", done)
    assert e.value.status == 409


def _rank(store, project, labeler, want_prompt, order, **extra):
    """Give ``labeler`` the task of ``want_prompt`` (next_task returns a held task first) and rank it
    in ``order`` (task positions)."""
    with store.transaction() as c:
        c.execute("UPDATE queue SET status = 'assigned', labeler = ? WHERE id = (SELECT q.id FROM queue q "
                  "JOIN prompts p ON p.id = q.prompt_id WHERE q.queue = ? AND p.text = ? AND q.status = 'pending' "
                  "ORDER BY q.id LIMIT 1)", (labeler, project.queue, want_prompt))
    t = tasks.next_task(store, project, labeler)
    assert t["prompt"] == want_prompt
    return tasks.submit(store, project, labeler, t["task_id"], body_for(project, labeler, t, order, **extra))


def test_stats_gold_accuracy_agreement_and_adjudication(proj):
    store, project, _ = proj
    _rank(store, project, "alice", GOLD.prompt, [[0], [1], [2], [3]], flags={3: ["hallucination"]})
    _rank(store, project, "bob", GOLD.prompt, [[3], [2], [1], [0]], flags={0: ["hallucination"]})
    _rank(store, project, "alice", "Prompt number 1", [[0], [1, 2], [3]])
    _rank(store, project, "bob", "Prompt number 1", [[0], [2], [1], [3]])
    s = project_stats(store, project)
    rows = {r["labeler"]: r for r in s["labelers"]}
    assert rows["alice"]["gold_accuracy"] == 1.0 and rows["alice"]["gold_flag_recall"] == 1.0
    assert rows["bob"]["gold_accuracy"] == 0.0 and rows["bob"]["gold_flag_recall"] == 0.0
    assert rows["alice"]["gold_pairs"] == 6
    # gold item: 6 strict pairs, all reversed; prompt 1: alice ties (1,2) so 5 strict pairs, all agree
    assert rows["alice"]["agreement_with_others"] == pytest.approx(5 / 11)
    a = s["agreement"]["all"]
    assert a["groups"] == 2 and a["pairs"] == 11 and a["pairwise"] == pytest.approx(5 / 11)
    data = np.array([[0, 1, 2, 3, 0, 1, 1, 2], [3, 2, 1, 0, 0, 2, 1, 3]], float)  # ranks per candidate
    assert a["krippendorff_alpha"] == pytest.approx(krippendorff_alpha_ordinal(data))
    assert s["agreement"]["a"]["groups"] == 1 and s["agreement"]["a"]["pairwise"] == 1.0
    assert s["progress"]["done"] == 4 and s["progress"]["gold_items"] == 1
    queue = s["disagreements"]
    assert [d["prompt"] for d in queue] == [GOLD.prompt, "Prompt number 1"]
    gold_item = queue[0]
    rid = adjudicate(store, project, "boss", gold_item["prompt_id"], gold_item["candidate_ids"], [[0], [1], [2], [3]])
    with pytest.raises(Invalid) as e:
        adjudicate(store, project, "boss", gold_item["prompt_id"], gold_item["candidate_ids"], [[0], [1], [2], [3]])
    assert e.value.status == 409
    r = [x for x in store.rankings() if x.id == rid][0]
    assert r.labeler == "adjudicator:boss" and [r.candidates[t[0]] for t in r.order] == GOLD.responses
    s2 = project_stats(store, project)
    assert [d["prompt"] for d in s2["disagreements"]] == ["Prompt number 1"]
    assert s2["progress"]["adjudicated"] == 1 and s2["agreement"]["all"]["pairs"] == 11
    assert {r["labeler"] for r in s2["labelers"]} == {"alice", "bob"}


def test_guidelines_markdown_is_escaped():
    html = render("# Title\nSome **bold** and `code`.\n\n- one\n- <b>two</b>\n\n<script>alert(1)</script>")
    assert "<h2>Title</h2>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<li>&lt;b&gt;two&lt;/b&gt;</li>" in html and "<script>" not in html


def test_public_host_needs_explicit_flag():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_host(host, allow_public=False)
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(PreflabError, match="refusing to listen"):
            check_host(host, allow_public=False)
    check_host("0.0.0.0", allow_public=True)


def run(argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_cli_create_to_rm(tmp_path, capsys):
    """`annotate create` -> `user` -> labelers rank -> `stats` -> `preflab rm` trains on the store."""
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "id": f"i{i}", "slice": "s",
                                             "responses": ["zebra apple", "green stone", "river light"]}) + "\n"
                                 for i in range(8)))
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": "2+2?", "responses": ["4", "5", "fish"], "order": [[0], [1], [2]],
                                "flags": {"2": ["fails_instruction"]}}) + "\n")
    guide = tmp_path / "guidelines.md"
    guide.write_text("# Be helpful\n")
    db = tmp_path / "s.sqlite"
    assert run(["annotate", "create", "--store", str(db), "--name", "demo", "--responses", str(responses),
                "--gold", str(gold), "--guidelines", str(guide), "--overlap", "0.25"]) == 0
    assert "8 prompts + 1 gold items, K=3, 15 tasks" in capsys.readouterr().out
    assert run(["annotate", "user", "--store", str(db), "ann"]) == 0
    token = capsys.readouterr().out.split("token ")[1].split()[0]
    with PreferenceStore(db) as store:
        assert authenticate(store, token).name == "ann"
        project = load_project(store)
        assert project.guidelines == "# Be helpful\n"
        while (t := tasks.next_task(store, project, "ann")) is not None:
            tasks.submit(store, project, "ann", t["task_id"], body_for(project, "ann", t, [[0], [1], [2]]))
        kway = store.grouped_kway(split="rm")  # what `preflab rm` reads from store:PATH
    assert len(kway) == 9 and all(g["meta"]["labeler"] == "ann" for g in kway)
    assert [g["responses"][g["order"][0][0]] for g in kway].count("zebra apple") == 8
    out = tmp_path / "stats.json"
    assert run(["annotate", "stats", "--store", str(db), "--json", str(out)]) == 0
    assert "9/15 tasks done" in capsys.readouterr().out
    assert json.loads(out.read_text())["progress"]["rankings"] == 9
    assert run(["annotate", "serve", "--store", str(db), "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on '0.0.0.0'" in capsys.readouterr().err
    run_dir = tmp_path / "rm"
    assert run(["rm", "model.path=tiny:", f"data.train=store:{db}", "data.val_fraction=0", "data.max_length=64",
                "train.max_steps=1", "train.batch_prompts=4", "train.bf16=false", "run.progress=false",
                f"run.out={run_dir}"]) in (0, None)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"
    assert "rm: 9 train rankings" in (run_dir / "log.txt").read_text()  # every ranking of the app, no conversion
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_cli_on_a_postgres_store(tmp_path, capsys, postgres_url):
    """The commands take a postgresql:// URL as --store: create, user, stats; the rankings are in the database."""
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "responses": ["a", "b", "c"]}) + "\n"
                                 for i in range(4)))
    assert run(["annotate", "create", "--store", postgres_url, "--name", "demo", "--responses", str(responses),
                "--overlap", "0"]) == 0
    assert f"project 'demo' in {postgres_url}: 4 prompts + 0 gold items, K=3, 4 tasks" in capsys.readouterr().out
    assert run(["annotate", "user", "--store", postgres_url, "ann"]) == 0
    token = capsys.readouterr().out.split("token ")[1].split()[0]
    with PreferenceStore(postgres_url) as store:
        assert authenticate(store, token).name == "ann"
        project = load_project(store)
        t = tasks.next_task(store, project, "ann")
        tasks.submit(store, project, "ann", t["task_id"], body_for(project, "ann", t, [[2], [0], [1]]))
    assert run(["annotate", "stats", "--store", postgres_url]) == 0
    assert "1/4 tasks done" in capsys.readouterr().out
    assert run(["annotate", "user", "--store", postgres_url.rsplit("/", 1)[0] + "/no_such_db", "bob"]) == 2
    assert 'database "no_such_db" does not exist' in capsys.readouterr().err


def test_cli_create_samples_candidates_from_a_model(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    assert run(["annotate", "create", "--store", str(db), "--name", "sampled", "--prompts",
                str(FIXTURES / "prompts_tiny.jsonl"), "--model", "tiny:", "--split", "any", "--limit", "3", "--k", "2",
                "--max-new-tokens", "4", "--overlap", "0"]) == 0
    assert "3 prompts + 0 gold items, K=2, 3 tasks" in capsys.readouterr().out
    with PreferenceStore(db) as store:
        p = load_project(store, "sampled")
        t = tasks.next_task(store, p, "x")
        assert t["k"] == 2 and all(isinstance(r, str) and r for r in t["responses"])
        assert {m for pr in store.prompts() for _, _, m in store.candidates(pr.id)} == {"tiny:"}
    assert run(["annotate", "create", "--store", str(db), "--name", "x", "--prompts",
                str(FIXTURES / "prompts_tiny.jsonl")]) == 2
    assert "--prompts needs --model" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["user", "bob"], ["user", "boss", "--admin"], ["token", "bob"], ["stats"],
                                     ["serve"]])
def test_only_create_makes_a_store(tmp_path, capsys, command):
    """A mistyped --store is an error, not a new empty store with a token for it (issue 27, item 9)."""
    typo = tmp_path / "typo.sqlite"
    assert run(["annotate", command[0], "--store", str(typo), *command[1:]]) == 2
    out = capsys.readouterr()
    assert f"error: {typo}: store does not exist (only `preflab annotate create` makes one" in out.err
    assert "token" not in out.out and not typo.exists()
