"""benchmarks/gpu_check.py without a GPU: ``--device cpu --tiny`` runs every part that can run on CPU
(the vLLM parts are skipped with the reason) and writes the report's structure; the isolated mode
(a process per part, a time limit) and ``--require``; and the vLLM part's weight-sync check
against the fake engine of test_generation_vllm, one that follows the policy (ok) and one that
keeps its first weights (failed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preflab import models
from preflab.rollout import make_generator
from test_generation_vllm import FakeLLM, sampling_params

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402

STAGE_PARTS = ("sft", "rm", "rl", "fsdp")


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_tiny_cpu_run_reports_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = run_script("--device", "cpu", "--tiny", "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "date", "smoke", "command", "device", "tiny", "model", "sizes", "versions", "gpu", "machine", "parts",
            "summary", "exit_code", "seconds", "rl_stage"} <= report.keys()
    assert report["benchmark"] == "gpu_check" and report["smoke"] and report["date"][:4].isdigit()
    assert report["device"] == "cpu" and report["tiny"] and report["model"] == "tiny:" and report["exit_code"] == 0
    assert report["rl_stage"] == "rl" and report["gpu"] is None
    assert {"torch", "transformers", "vllm"} <= report["versions"].keys()
    assert report["versions"]["torch"] == torch.__version__
    assert {"cpu", "cores", "load_1m"} <= report["machine"].keys()  # benchmarks/machine.py
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == list(gpu_check.PARTS)
    for p in parts.values():
        assert p["status"] in ("ok", "skipped"), (p["part"], p.get("reason"), p.get("error", "")[-2000:])
        assert {"what", "reason", "seconds", "step_s", "tokens_per_s", "peak_gpu_mib", "peak_rss_mib",
                "details"} <= p.keys()
        assert p["peak_gpu_mib"] is None and (p["status"] == "skipped" or p["peak_rss_mib"] > 0)
    for name in ("vllm", "rl_vllm"):
        assert parts[name]["status"] == "skipped" and "CUDA" in parts[name]["reason"]
    assert report["summary"] == {"ok": len(parts) - 2, "failed": 0, "skipped": 2}
    for name in STAGE_PARTS:
        step = parts[name]["step_s"]
        assert len(step["steps"]) >= 2 and step["median"] > 0 and parts[name]["tokens_per_s"] > 0
    assert parts["sample"]["tokens_per_s"] > 0 and parts["sample"]["step_s"] is None
    rl = parts["rl"]["details"]
    assert rl["backend"] == "hf" and rl["reward_model"] == "the rm part's export" and rl["gen_s"] > 0
    fsdp = parts["fsdp"]["details"]
    assert any(f.endswith("sharded/__0_0.distcp") for f in fsdp["checkpoint_files"])  # it did shard
    assert fsdp["first_loss_diff"] <= fsdp["first_loss_tolerance"] == 1e-4
    assert "preflab GPU path" in r.stdout and "skipped" in r.stdout  # the table


def test_isolated_parts_time_limit_and_require(tmp_path):
    """A process per part (the default on CUDA): the fsdp part reads the sft part's losses across
    processes; a part past its time limit fails; --require turns a skip into a failure."""
    out = tmp_path / "iso.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1", "--isolate", "--parts", "sft,fsdp",
                           "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, [(p["part"], p["reason"], p.get("error", "")[-2000:]) for p in report["parts"]]
    assert report["isolated"] and [p["status"] for p in report["parts"]] == ["ok", "ok"]
    assert report["parts"][1]["details"]["first_loss_diff"] == pytest.approx(0, abs=1e-4)

    code = gpu_check.main(["--device", "cpu", "--tiny", "--isolate", "--parts", "rm,vllm", "--require", "vllm",
                           "--timeout-scale", "0.0001", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["exit_code"] == 1 and report["summary"] == {"ok": 0, "failed": 2, "skipped": 0}
    rm, vllm = report["parts"]
    assert rm["reason"].startswith("stopped after")
    assert vllm["reason"].startswith("required, but skipped: vLLM runs on CUDA only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_fails_every_part(tmp_path):
    out = tmp_path / "nocuda.json"
    assert gpu_check.main(["--tiny", "--parts", "sft,vllm", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [p["status"] for p in report["parts"]] == ["failed", "failed"]
    assert all("no CUDA device" in p["reason"] for p in report["parts"])


class StaleLLM(FakeLLM):
    """A fake engine that keeps the first weights it was sent (later copies are counted, not loaded)."""

    def __init__(self, like, tok):
        super().__init__(like, tok)
        load = self.model.load_weights

        def first_only(weights):
            if self.model.loads == 0:
                load(weights)
            else:
                self.model.loads += 1

        self.model.load_weights = first_only

    def reset_prefix_cache(self):
        pass


def test_vllm_part_with_an_engine_that_follows(tmp_path):
    """The vllm part on the fake engine (the engine loads what it is sent and samples greedily)."""
    tok = models.load_tokenizer("tiny:")
    like = models.load_policy("tiny:", device="cpu")
    c = gpu_check.Check("cpu", True, tmp_path, gpu_check.TINY)
    torch.manual_seed(0)
    result = gpu_check.part_vllm(c, llm=FakeLLM(like, tok), sampling_params=sampling_params)
    assert result["status"] == "ok", result["reason"]
    d = result["details"]
    assert d["syncs"] == {"first_call": 1, "call_without_update": 1, "after_update": 2}
    assert d["update"]["fused_adamw"]  # the version counters do not move: the step hook must be seen
    assert d["agree_after_update"] == d["differ_from_before"] == d["prompts"] == 4
    assert d["policy_answers_target"] >= 1
    assert d["prefix_cache_resets_with_the_update"] == 1  # the engine drops the old weights' cached prefixes
    assert "after_reset_prefix_cache_equal_preflab" not in d
    assert result["tokens_per_s"] > 0 and d["sampling"]["k"] == gpu_check.TINY.sample_k


def test_weight_sync_check_fails_when_the_engine_keeps_old_weights():
    torch.manual_seed(0)
    policy = models.load_policy("tiny:", device="cpu", dropout_off=True)
    tok = models.load_tokenizer("tiny:")
    gen = make_generator(policy, tok, backend="vllm", llm=StaleLLM(policy, tok), sampling_params=sampling_params)
    result = gpu_check.weight_sync_check(gen, policy, tok, lr=gpu_check.TINY.sync_lr,
                                         max_steps=gpu_check.TINY.sync_max_steps, device="cpu")
    d = result["details"]
    assert result["status"] == "failed"
    assert "greedy samples after the update equal preflab's engine" in result["reason"]
    assert "greedy samples after the update differ from before" in result["reason"]
    assert "prefix cache reset with the weight copy" not in result["reason"]  # the sync does reset it
    assert d["syncs"]["after_update"] == 2 and d["agree_after_update"] == 0
    assert d["after_reset_prefix_cache_equal_preflab"] is False  # the diagnosis ran
