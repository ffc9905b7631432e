"""preflab repro: pack a (tiny) run, verify it reproduces; a changed file or number is reported."""

import json
import tarfile

import pytest

from preflab.cli import main
from preflab.release.repro import pack, verify


def _run(args):
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small run: suite prompts, a saved model, pipeline_config.json and an evaluation."""
    from preflab import models
    from preflab.data.jsonl import write_jsonl
    from preflab.data.suite import generate_suite
    from preflab.evals.evaluate import evaluate

    run = tmp_path_factory.mktemp("run")
    suite = generate_suite(seed=0, n=400)
    write_jsonl(run / "data" / "prompts.jsonl", [p.to_dict() for p in suite])
    prompts = [p for p in suite if p.split == "eval"][:6]
    model = models.load_policy("tiny:3")
    models.save_model(model, models.load_tokenizer("tiny:3"), run / "ppo" / "model", reward_model=False)
    (run / "pipeline_config.json").write_text(json.dumps({"suite": {"seed": 0, "n": 400}, "eval": {"bf16": False}}))
    evaluate({"sft": "tiny:7", "ppo": str(run / "ppo" / "model")}, prompts, reference="sft", out_dir=run / "eval",
             max_new_tokens=6, temperature=0.7, seed=0, progress=False, bf16=False)
    return run


def test_pack_holds_what_the_issue_lists(run_dir, tmp_path):
    path = pack(run_dir, tmp_path / "r.tar.gz")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        m = json.load(tar.extractfile("repro.json"))
    assert {"repro.json", "files/eval/results.json", "files/eval/samples.jsonl", "files/pipeline_config.json"} <= set(names)
    assert "data/prompts.jsonl" in m["data"] and list(m["models"]) == ["ppo/model"]
    assert m["suite"] == {"seed": 0, "n": 400} and len(m["eval"]["prompt_ids"]) == 6
    assert any(x.startswith("torch==") for x in m["pip_freeze"]) and m["hardware"]["cpus"] >= 1
    assert m["git"] is None or len(m["git"]["commit"]) == 40


def test_verify_reproduces_and_reports_changes(run_dir, tmp_path):
    path = tmp_path / "r.tar.gz"
    assert _run(["repro", "pack", str(run_dir), "--out", str(path)]) == 0
    assert _run(["repro", "verify", str(path), "--out", str(tmp_path / "again")]) == 0
    report = verify(path, out_dir=tmp_path / "again2")
    assert report["passed"] and all(n["ok"] for n in report["numbers"])
    metrics = {(n["model"], n["metric"]) for n in report["numbers"]}
    assert ("ppo", "win_rate.rate") in metrics and ("ppo", "kl") in metrics

    # a recorded number that the re-run does not give is reported, exit 1
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(path) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "files/eval/results.json":
                res = json.loads(data)
                res["models"]["ppo"]["kl"] += 5.0
                data = json.dumps(res).encode()
                member.size = len(data)
            import io

            dst.addfile(member, io.BytesIO(data))
    report = verify(bad, out_dir=tmp_path / "again3")
    assert not report["passed"]
    assert [(n["model"], n["metric"]) for n in report["numbers"] if not n["ok"]] == [("ppo", "kl")]

    # a data file changed since packing: its hash is reported
    prompts = run_dir / "data" / "prompts.jsonl"
    original = prompts.read_text()
    try:
        prompts.write_text(original + "\n")
        report = verify(path, out_dir=tmp_path / "again4")
        assert [h["path"] for h in report["hashes"] if not h["ok"]] == ["data/prompts.jsonl"]
        assert not report["passed"]
    finally:
        prompts.write_text(original)


def test_pack_needs_an_evaluation(tmp_path):
    with pytest.raises(Exception, match="eval/results.json"):
        pack(tmp_path)
    (tmp_path / "x.tar.gz").write_text("not an archive")
    with pytest.raises(Exception, match="not a preflab repro archive"):
        verify(tmp_path / "x.tar.gz")


def _flip_a_digit(path):
    """A one-byte edit that keeps the file valid: its first digit changed."""
    data = path.read_bytes()
    i = next(i for i, b in enumerate(data) if chr(b).isdigit())
    path.write_bytes(data[:i] + (b"2" if data[i:i + 1] == b"1" else b"1") + data[i + 1:])


@pytest.mark.parametrize("rel", ["eval/results.json", "eval/samples.jsonl"])
def test_a_one_byte_edit_of_a_packed_eval_output_is_a_diff(run_dir, tmp_path, capsys, rel):
    path = pack(run_dir, tmp_path / "r.tar.gz")
    f = run_dir / rel
    original = f.read_bytes()
    try:
        _flip_a_digit(f)
        assert _run(["repro", "verify", str(path), "--out", str(tmp_path / "again")]) == 1
    finally:
        f.write_bytes(original)
    out = capsys.readouterr().out
    assert f"DIFF  data  {rel}" in out and "repro: NOT REPRODUCED" in out
    assert [line for line in out.splitlines() if line.startswith("DIFF")] == [line for line in out.splitlines()
                                                                             if f"  {rel}  " in line]


def test_a_prompts_file_that_no_longer_parses_is_a_diff_with_the_table(run_dir, tmp_path, capsys):
    path = pack(run_dir, tmp_path / "r.tar.gz")
    prompts = run_dir / "data" / "prompts.jsonl"
    original = prompts.read_text()
    try:
        prompts.write_text(original.replace('{"', "{", 1))  # line 1 is no longer JSON
        assert _run(["repro", "verify", str(path), "--out", str(tmp_path / "again")]) == 1
        report = verify(path, out_dir=tmp_path / "again2")
    finally:
        prompts.write_text(original)
    out = capsys.readouterr().out
    assert "DIFF  data  data/prompts.jsonl" in out and "ok    model ppo/model" in out  # the whole table
    assert "DIFF  the re-evaluation could not run: " in out and "prompts.jsonl:1: invalid JSON" in out
    assert out.rstrip().splitlines()[-1].startswith("repro: NOT REPRODUCED")
    assert not report["passed"] and report["numbers"] == [] and "prompts.jsonl:1" in report["error"]
    assert [h["path"] for h in report["hashes"] if not h["ok"]] == ["data/prompts.jsonl"]
