"""The preference store. Every test that takes ``store`` or ``store_spec`` runs on both back ends:
a SQLite file, then a PostgreSQL database (skipped where PostgreSQL cannot run; tests/pg_server.py)."""

import multiprocessing as mp
import sqlite3
import time

import pytest

from preflab.data.schema import Demonstration, Prompt
from preflab.errors import DataError
from preflab.feedback import store as store_mod
from preflab.feedback.store import PreferenceStore, is_url


@pytest.fixture
def store(store_spec):
    with PreferenceStore(store_spec) as s:
        yield s


def _prompt_with(store, k=4, text="Write a haiku.", split="rm"):
    pid = store.add_prompts([Prompt(text=text, category="poetry", split=split)])[0]
    cids = store.add_candidates(pid, [f"response {i}" for i in range(k)], model="sft")
    return pid, cids


def test_add_and_read_back_a_ranking_with_ties(store):
    pid, cids = _prompt_with(store)
    rid = store.add_ranking(pid, cids, [[2], [0, 3], [1]], "alice", time_s=41.5, flags=["unsafe"])
    (r,) = store.rankings()
    assert r.id == rid and r.prompt_id == pid and r.candidate_ids == cids
    assert r.order == [[2], [0, 3], [1]] and r.labeler == "alice" and r.time_s == 41.5
    assert r.flags == ["unsafe"] and r.split == "rm" and r.models == ["sft"] * 4
    assert r.candidates == ["response 0", "response 1", "response 2", "response 3"]
    (g,) = store.grouped_kway()
    assert g["prompt"] == "Write a haiku." and g["responses"] == r.candidates and g["order"] == r.order
    assert g["meta"]["labeler"] == "alice" and g["meta"]["ranking_id"] == rid
    assert store.rankings(labeler="bob") == [] and store.grouped_kway(split="eval") == []


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda c, o: (c, [[0], [1], [2]]), "ranks 3 of K=4"),  # wrong K vs candidates given
        (lambda c, o: (c[:3] + [9999], o), "unknown candidate id 9999"),
        (lambda c, o: ([c[0], c[0], c[1], c[2]], o), "duplicate candidate"),
        (lambda c, o: (c, [[0], [1, 2], [2, 3]]), "ranked twice"),  # a rank outside a tie
        (lambda c, o: (c, [[0], [1], [2], [7]]), "outside 0..3"),
        (lambda c, o: (c, []), "order is empty"),
    ],
)
def test_bad_ranking_rejected_with_reason_and_nothing_written(store, mutate, reason):
    pid, cids = _prompt_with(store)
    store.add_ranking(pid, cids, [[0], [1], [2], [3]], "alice")
    before = store.counts()
    c, o = mutate(cids, [[0], [1], [2], [3]])
    with pytest.raises(DataError, match=reason):
        store.add_ranking(pid, c, o, "bob")
    assert store.counts() == before


def test_candidates_from_another_prompt_rejected(store):
    pid, cids = _prompt_with(store)
    _, other = _prompt_with(store, text="Another prompt")
    before = store.counts()
    with pytest.raises(DataError, match=f"candidate {other[0]} belongs to prompt"):
        store.add_ranking(pid, [other[0], *cids[1:]], [[0], [1], [2], [3]], "alice")
    with pytest.raises(DataError, match="labeler"):
        store.add_ranking(pid, cids, [[0], [1], [2], [3]], "")
    with pytest.raises(DataError, match="time_s"):
        store.add_ranking(pid, cids, [[0], [1], [2], [3]], "a", time_s=-1)
    with pytest.raises(DataError, match="unknown prompt"):
        store.add_ranking(12345, cids, [[0], [1], [2], [3]], "a")
    assert store.counts() == before


def test_failed_batch_rolls_back_everything(store):
    before = store.counts()
    with pytest.raises(DataError):
        with store.transaction():
            pid, cids = _prompt_with(store)
            store.add_ranking(pid, cids, [[0], [1], [2], [3]], "alice")
            store.add_ranking(pid, cids, [[0], [1]], "alice")  # bad: the whole batch goes
    assert store.counts() == before


def test_not_rankable_may_have_no_order_and_is_left_out_of_kway(store):
    pid, cids = _prompt_with(store)
    store.add_ranking(pid, cids, [], "alice", flags=["not_rankable"])
    assert store.counts()["rankings"] == 1
    assert store.grouped_kway() == []


def test_prompts_uid_and_lookup(store):
    a, b = store.add_prompts([Prompt(text="Hi  there", uid="suite/1"), {"text": "x", "split": "eval"}])
    assert store.add_prompts([Prompt(text="changed", uid="suite/1")]) == [a]
    assert store.find_prompt("Hi there") == a and store.find_prompt("nope") is None
    assert [p.id for p in store.prompts(split="eval")] == [b]
    with pytest.raises(DataError, match="empty"):
        store.add_prompts([""])


def test_demonstrations(store):
    pid, _ = _prompt_with(store)
    ids = store.add_demonstrations([Demonstration(prompt="Write a haiku.", response="Old pond"),
                                    {"prompt": "New prompt", "response": "Answer", "labeler": "bob"}], split="sft")
    assert len(ids) == 2
    demos = store.demonstrations()
    assert demos[0].prompt_id == pid and demos[1].labeler == "bob"
    assert [d.response for d in store.demonstrations(split="sft")] == ["Answer"]


def test_queue_assigns_each_task_once_and_completes(store):
    pid, cids = _prompt_with(store)
    t_ids = store.enqueue("rm", pid, cids, copies=2)
    assert store.queue_counts("rm") == {"pending": 2, "assigned": 0, "done": 0}
    ta = store.next_task("alice")
    assert ta.candidates[0] == "response 0" and ta.status == "assigned"
    assert store.next_task("alice").id == ta.id  # resumes her open task
    tb = store.next_task("bob")
    assert {ta.id, tb.id} == set(t_ids)
    assert store.next_task("carol") is None
    rid = store.complete(ta.id, [[1], [0, 2], [3]], "alice", time_s=10)
    assert store.task(ta.id).ranking_id == rid
    with pytest.raises(DataError, match="not assigned to 'alice'"):
        store.complete(tb.id, [[0], [1], [2], [3]], "alice")
    with pytest.raises(DataError, match="ranks"):
        store.complete(tb.id, [[0]], "bob")
    assert store.task(tb.id).status == "assigned"  # bad ranking: task untouched
    assert store.next_task("alice") is None  # she already had this prompt
    store.release(tb.id)
    assert store.next_task("carol").id == tb.id
    c = store.counts()
    assert (c["rankings"], c["queue_done"], c["queue_assigned"]) == (1, 1, 1)


def test_schema_version_recorded_and_reopen(store_spec):
    path = store_spec
    with PreferenceStore(path) as s:
        assert s.schema_version() == len(store_mod.MIGRATIONS) == 1
        pid, cids = _prompt_with(s)
        s.add_ranking(pid, cids, [[0], [1], [2], [3]], "alice")
    with PreferenceStore(path) as s:
        assert s.schema_version() == 1 and s.counts()["rankings"] == 1
        assert [tuple(r) for r in s.query("SELECT version FROM schema_version")] == [(1,)]
    if not is_url(path):
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version, description FROM schema_version").fetchall()[0][0] == 1
        conn.close()


def test_pending_migration_applied_in_order(store_spec, monkeypatch):
    path = store_spec
    with PreferenceStore(path) as s:
        pid, cids = _prompt_with(s)
    applied = []

    def v2(conn):
        applied.append(2)
        conn.execute("ALTER TABLE prompts ADD COLUMN source TEXT")

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, ("add prompts.source", v2)])
    with PreferenceStore(path) as s:
        assert s.schema_version() == 2 and applied == [2]
        assert s.counts()["candidates"] == 4
    with PreferenceStore(path) as s:  # nothing pending: not applied twice
        assert applied == [2]
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    with pytest.raises(DataError, match="newer"):
        PreferenceStore(path)


def _writer(path, pid, cids, labeler, n, barrier):
    with PreferenceStore(path) as s:
        barrier.wait(30)  # both connections open: the writes really interleave
        for i in range(n):
            s.add_ranking(pid, cids, [[i % 4], [(i + 1) % 4, (i + 2) % 4], [(i + 3) % 4]], labeler, time_s=float(i))


def test_two_processes_writing_at_once_lose_nothing(store_spec):
    path = store_spec
    with PreferenceStore(path) as s:
        pid, cids = _prompt_with(s)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, pid, cids, f"w{j}", 200, barrier)) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with PreferenceStore(path) as s:
        assert s.counts()["rankings"] == 400
        rs = s.rankings()
        assert len([r for r in rs if r.labeler == "w0"]) == len([r for r in rs if r.labeler == "w1"]) == 200
        assert sorted(r.time_s for r in rs if r.labeler == "w1") == [float(i) for i in range(200)]


def _opener(path, barrier):
    barrier.wait(30)  # all open a store that does not exist yet: WAL switch and migration race
    with PreferenceStore(path) as s:
        s.add_prompts([f"prompt {i}" for i in range(20)])


def test_processes_creating_a_new_store_at_once(store_spec):
    path = store_spec  # a new file, or an empty database
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_opener, args=(path, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with PreferenceStore(path) as s:
        assert s.counts()["prompts"] == 80 and s.schema_version() == 1


def test_numpy_ids_and_orders_accepted(store):
    np = pytest.importorskip("numpy")
    pid, cids = _prompt_with(store, k=3)
    rid = store.add_ranking(np.int64(pid), np.array(cids), [np.array([2]), np.array([0, 1])], "alice")
    assert store.rankings()[0].id == rid and store.rankings()[0].order == [[2], [0, 1]]


def _taker(path, labelers, barrier, out):
    """Take and complete tasks in turn for ``labelers`` until none of them gets one."""
    got = []
    with PreferenceStore(path) as s:
        barrier.wait(30)
        idle = 0
        for turn in range(10_000):
            lab = labelers[turn % len(labelers)]
            task = s.next_task(lab, "rm")
            if task is None:
                idle += 1
                if idle == len(labelers):
                    break
                continue
            idle = 0
            s.complete(task.id, [[0], [1], [2], [3]], lab)
            got.append((task.id, task.prompt_id, lab))
            time.sleep(0.002)  # a labeler's pause: the other process gets the SQLite write lock too
    out.put(got)


def test_two_processes_taking_tasks_never_get_the_same_one(store_spec):
    """Two processes, three labelers each, take every task of a queue (two copies per prompt) at once:
    each task goes to one labeler, once, and no labeler gets both copies of a prompt."""
    with PreferenceStore(store_spec) as s:
        for i in range(40):
            pid, cids = _prompt_with(s, text=f"prompt {i}")
            s.enqueue("rm", pid, cids, copies=2)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(store_spec, [f"p{j}-{i}" for i in range(3)], barrier, out))
             for j in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    taken = [t for got in results for t in got]
    assert all(results)  # both processes took tasks
    assert len(taken) == 80 and len({task for task, _, _ in taken}) == 80
    assert len({(prompt, lab) for _, prompt, lab in taken}) == 80
    with PreferenceStore(store_spec) as s:
        assert s.queue_counts("rm") == {"pending": 0, "assigned": 0, "done": 80}
        assert sorted(r.meta["task_id"] for r in s.rankings()) == sorted(task for task, _, _ in taken)


# -- the PostgreSQL back end ------------------------------------------------------------------


def test_postgres_sql_translation():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    from preflab.feedback.store_pg import redact, translate

    assert translate("SELECT id FROM t WHERE a = ? AND b LIKE '%?%' AND \"o?\" = ?") == (
        "SELECT id FROM t WHERE a = %s AND b LIKE '%%?%%' AND \"o?\" = %s")
    assert translate("CREATE TABLE x (id INTEGER PRIMARY KEY, n INTEGER, t REAL, s TEXT DEFAULT 'INTEGER')") == (
        "CREATE TABLE x (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT, t DOUBLE PRECISION, "
        "s TEXT DEFAULT 'INTEGER')")
    assert translate("SELECT 'REAL', 1 AS integer_count") == "SELECT 'REAL', 1 AS integer_count"
    assert translate("CREATE INDEX queue_status ON queue(queue, status)") == (
        "CREATE INDEX queue_status ON queue(queue, status, id)")  # SQLite's indexes end with the rowid
    assert translate("CREATE UNIQUE INDEX u ON t(a)") == "CREATE UNIQUE INDEX u ON t(a)"
    assert redact("postgresql://ann:s3cret@db.example:5432/prefs") == "postgresql://ann:***@db.example:5432/prefs"
    assert redact("postgres://ann@db/prefs?password=x&sslmode=require") == "postgres://ann@db/prefs?password=***&sslmode=require"


def test_postgres_store_errors_name_the_problem(postgres_server, monkeypatch):
    missing = postgres_server.url("no_such_db")
    with pytest.raises(DataError, match=r"postgresql://preflab@127.0.0.1:\d+/no_such_db: cannot open the store "
                                        r'\(.*"no_such_db" does not exist'):
        PreferenceStore(missing)
    import preflab.feedback

    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)  # as if psycopg were not installed
    monkeypatch.delitem(__import__("sys").modules, "preflab.feedback.store_pg")
    monkeypatch.delattr(preflab.feedback, "store_pg")
    with pytest.raises(DataError, match=r"needs psycopg: pip install 'preflab\[postgres\]'"):
        PreferenceStore(missing)


def test_postgres_connection_dropped_between_transactions_is_reopened(postgres_url):
    import psycopg

    with PreferenceStore(postgres_url) as s:
        pid, cids = _prompt_with(s)
        (backend,) = s.query("SELECT pg_backend_pid()")[0]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        assert s.counts()["candidates"] == 4  # a read reconnects
        s.add_ranking(pid, cids, [[0], [1], [2], [3]], "alice")
        (backend,) = s.query("SELECT pg_backend_pid()")[0]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        s.add_ranking(pid, cids, [[3], [2], [1], [0]], "bob")  # so does a write transaction's BEGIN
        assert [r.labeler for r in s.rankings()] == ["alice", "bob"]


def test_postgres_next_task_skips_a_task_another_transaction_holds(postgres_url):
    """While one connection has claimed a task and not committed, another takes the next one at once
    (FOR UPDATE SKIP LOCKED) rather than waiting for it or taking the same."""
    with PreferenceStore(postgres_url) as a, PreferenceStore(postgres_url, timeout_s=5) as b:
        for i in range(2):
            pid, cids = _prompt_with(a, text=f"prompt {i}")
            a.enqueue("rm", pid, cids)
        with a.transaction(exclusive=False):
            held = a.next_task("alice")
            other = b.next_task("bob")
            assert other is not None and other.id != held.id
            assert b.next_task("carol") is None
        assert a.queue_counts("rm") == {"pending": 0, "assigned": 2, "done": 0}
