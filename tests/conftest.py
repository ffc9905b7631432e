import os

# One thread per test process: `make test` runs two pytest workers on two cores, and the tiny
# models are far slower with oversubscribed OpenMP threads than with one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random policy and its tokenizer (2-layer Llama, byte-level, ChatML template), seeded,
    in eval mode; shared by the tests of a module that only read it."""
    import torch

    from preflab import models

    torch.manual_seed(0)
    return models.load_policy("tiny:"), models.load_tokenizer("tiny:")


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (tests/pg_server.py); the test is skipped where none can start."""
    from pg_server import start_or_skip

    server = start_or_skip()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A new empty database on that server, as a postgresql:// URL."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_spec(request, tmp_path):
    """Where a new preference store lives: a SQLite file, then a PostgreSQL database (skipped where
    PostgreSQL cannot run). A test that takes it runs on both back ends."""
    if request.param == "sqlite":
        return tmp_path / "prefs.db"
    return request.getfixturevalue("postgres_url")
