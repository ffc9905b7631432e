"""The run directory (issue 27, items 3, 4 and 8): ``--resume`` needs a run, one process writes a
run directory at a time (an flock on RUN/.lock), and an output path that is a file is one error."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import run_cli, write_demos
from preflab.errors import PreflabError
from preflab.run import LOCK_FILE, RunDir, lock_run_dir, read_manifest, unlock_run_dir

# A second process that takes the lock of sys.argv[1], says so, and holds it until killed.
HOLDER = ("import sys, time; from preflab.run import lock_run_dir; lock_run_dir(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(120)")




def sft_args(tmp_path, out, *extra):
    demos = write_demos(tmp_path / "demos.jsonl", 16)
    return ["sft", "model.path=tiny:", f"data.train={demos}", "data.val_fraction=0", "data.max_length=96",
            "train.max_steps=1", "train.bf16=false", "train.batch_size=4", "run.progress=false",
            f"run.out={out}", *extra]


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def holder(tmp_path):
    """``start(dir)``: a subprocess holding ``dir``'s lock; killed (-9) at the end of the test."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# -- 3. --resume on a directory that is not a run ------------------------------------------------


def test_resume_of_a_data_folder_is_one_error_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    before = listing(data)
    assert run_cli(sft_args(tmp_path, data, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"error: {data}: nothing to resume: it is not a preflab run directory (no manifest.json)" in err
    assert "Traceback" not in err
    assert listing(data) == before  # no checkpoints/, model/, manifest.json or lock file


def test_resume_of_a_missing_directory_creates_nothing(tmp_path):
    missing = tmp_path / "runs" / "typo"
    with pytest.raises(PreflabError, match=r"typo: nothing to resume: it does not exist"):
        RunDir(missing, stage="t", config={}, seed=0, resume=True)
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_run_still_works(tmp_path):
    RunDir(tmp_path / "run", stage="t", config={}, seed=0).finish()
    again = RunDir(tmp_path / "run", stage="t", config={}, seed=0, resume=True)
    assert read_manifest(tmp_path / "run")["resumed_at"]
    again.finish()


# -- 4. one writer per run directory -------------------------------------------------------------


def test_a_stage_run_directory_held_by_this_process_is_refused_to_another(tmp_path):
    run = RunDir(tmp_path / "run", stage="t", config={}, seed=0)
    assert (tmp_path / "run" / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    second = [sys.executable, "-c", "import sys; from preflab.run import RunDir; "
              "RunDir(sys.argv[1], stage='t', config={}, seed=0, resume=True)", str(tmp_path / "run")]
    proc = subprocess.run(second, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"PreflabError: {tmp_path / 'run'} is in use by pid {os.getpid()} on " in proc.stderr
    assert read_manifest(tmp_path / "run")["pid"] == os.getpid()  # the second wrote nothing
    run.finish()  # the end of the run gives the lock back
    proc = subprocess.run(second, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_second_pipeline_on_the_same_out_is_refused_before_any_write(tmp_path, capsys, holder):
    out = tmp_path / "run"
    first = holder(out)
    assert run_cli(["pipeline", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} is in use by pid {first.pid} on " in err and "Traceback" not in err
    assert listing(out) == [LOCK_FILE]  # no pipeline_config.json, no data/
    (out / "keep.txt").write_text("the first one's file")
    assert run_cli(["pipeline", "--preset", "tiny", "--out", str(out), "--restart"]) == 2
    assert f"{out} is in use by pid {first.pid}" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "the first one's file"  # --restart deleted nothing
    first.send_signal(signal.SIGKILL)  # a killed holder's lock goes with it
    first.wait()
    lock_run_dir(out)
    assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    unlock_run_dir(out)


def test_a_stage_on_a_directory_held_by_another_process_is_refused(tmp_path, capsys, holder):
    out = tmp_path / "run"
    first = holder(out)
    assert run_cli(sft_args(tmp_path, out)) == 2
    assert f"error: {out} is in use by pid {first.pid} on " in capsys.readouterr().err
    assert listing(out) == [LOCK_FILE]


def test_two_writers_started_together_one_is_refused(tmp_path):
    """Two processes released at the same moment race for one directory: one runs, the other is
    refused by the lock, and the metrics are the winner's alone (not steps 1, 1, 2, 2)."""
    out, go = tmp_path / "run", tmp_path / "go"
    code = ("import pathlib, sys, time\nfrom preflab.run import RunDir\nprint('ready', flush=True)\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
            "r = RunDir(sys.argv[1], stage='t', config={}, seed=0)\n"
            "r.log_metrics(1, {'x': 1.0}); time.sleep(3); r.log_metrics(2, {'x': 2.0}); r.finish()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1]
    loser = next(err for rc, err in results if rc)
    assert f"{out} is in use by pid " in loser
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_a_holder_that_has_not_written_its_pid_yet_is_waited_for(tmp_path):
    """The window between another process's flock and its pid line: the refused process waits for
    the line (up to 2 s), also past a dead holder's line left in the file, and names the pid; a
    holder that never writes one is named as such."""
    out = tmp_path / "run"
    out.mkdir()
    code = ("import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\ntime.sleep(float(sys.argv[2]))\n"
            "f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on here\\n'); f.flush()\ntime.sleep(30)\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"pid {dead.pid} on {socket.gethostname()}\n"  # a killed holder's line, left in the file
    for delay, named, before in ((0.2, True, ""), (0.2, True, stale), (60, False, "")):
        (out / LOCK_FILE).write_text(before)
        p = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK_FILE), str(delay)],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "locked"
            with pytest.raises(PreflabError) as e:
                lock_run_dir(out)
            want = f"in use by pid {p.pid} on here" if named else "in use by a process that has not written its pid"
            assert want in str(e.value)
        finally:
            p.kill()
            p.wait()


# -- 8. an output path that is a file ------------------------------------------------------------


def test_run_out_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("not a directory")
    assert run_cli(sft_args(tmp_path, f)) == 2
    err = capsys.readouterr().err
    assert f"error: {f}: is a file, not a directory; choose another output directory" in err
    assert "Traceback" not in err and f.read_text() == "not a directory"
    assert run_cli(sft_args(tmp_path, f / "run")) == 2  # a file in the way further up
    assert f"error: {f / 'run'}: cannot create the directory (Not a directory" in capsys.readouterr().err
    assert run_cli(["pipeline", "--preset", "tiny", "--out", str(f)]) == 2
    assert f"error: {f}: is a file, not a directory" in capsys.readouterr().err


def test_the_lock_is_taken_again_by_its_own_process(tmp_path, holder):
    """Nested takes in one process (a pipeline and its stage, a reopened run) do not block; the
    lock goes when the last is given back."""
    lock_run_dir(tmp_path)
    RunDir(tmp_path, stage="t", config={}, seed=0).finish()
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    unlock_run_dir(tmp_path)
    holder(tmp_path)  # another process takes it now


def test_peak_rss_is_the_processs_own_not_its_parents_at_fork():
    """A stage started by a process that holds a model must report its own peak: Linux's ru_maxrss
    keeps the parent's resident size across fork and exec (benchmarks/fsdp_memory.py's baseline
    once read 1.4 GiB for a 0.4 GiB run because its parent held the benchmark's model)."""
    blob = b"\x01" * (400 * 2**20)  # written, so resident in this process
    out = subprocess.run([sys.executable, "-c", "from preflab.run import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    assert len(blob) and float(out) < 200, out
