"""threads: auto (None): one torch thread per core other processes leave free, with one warning."""

import os

import pytest
import torch

from preflab import models


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(models, "_WARNED_BUSY", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("busy,threads", [(0.0, 2), (0.4, 2), (0.6, 1), (1.3, 1), (2.0, 1), (7.0, 1)])
def test_auto_uses_the_cores_others_leave_free(two_cores, monkeypatch, busy, threads):
    monkeypatch.setattr(models, "busy_cores_of_others", lambda window=0.1: busy)
    models.set_threads(None)
    assert torch.get_num_threads() == threads


def test_a_busy_machine_is_said_once(two_cores, monkeypatch, capsys):
    monkeypatch.setattr(models, "busy_cores_of_others", lambda window=0.1: 1.0)
    models.set_threads(None)
    models.set_threads(None)
    err = capsys.readouterr().err
    assert err.count("warning: other processes keep 1.0 of this machine's 2 cores busy; using 1 thread") == 1


def test_an_explicit_count_is_used_without_probing(two_cores, monkeypatch):
    def probe(window=0.1):
        raise AssertionError("probed")

    monkeypatch.setattr(models, "busy_cores_of_others", probe)
    models.set_threads(2)
    assert torch.get_num_threads() == 2


def test_omp_num_threads_caps_auto(two_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(models, "busy_cores_of_others", lambda window=0.1: 0.0)
    models.set_threads(None)
    assert torch.get_num_threads() == 1


def test_the_probe_sees_another_process_burn_a_core():
    """A real busy loop in a child process shows up as about one core (between 0.5 and 1.5)."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = models.busy_cores_of_others(window=0.5)
    finally:
        child.kill()
    assert 0.5 <= busy <= 1.0 + (os.cpu_count() or 1)
