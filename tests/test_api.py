"""The Python API: what the README shows runs, and `import preflab` stays cheap."""

import json
import subprocess
import sys

import preflab


def test_api_names_resolve_lazily_and_match_the_modules():
    from preflab import config, registry

    assert preflab.SFTConfig is config.SFTConfig and preflab.load_config is config.load_config
    assert preflab.STAGES is registry.STAGES and {"sft", "rm", "rl"} <= set(preflab.STAGES)
    code = "import sys, preflab; preflab.SFTConfig; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_runs_a_stage_from_python(tmp_path):
    cfg = preflab.load_config(preflab.SFTConfig, "configs/sft_tiny.yaml", [f"run.out={tmp_path}", "train.max_steps=2"])
    model = preflab.train("sft", cfg)
    assert (model / "config.json").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["train"]["max_steps"] == 2


def test_pipeline_runs_the_tiny_recipe_from_python(tmp_path):
    run = preflab.run_pipeline(str(tmp_path / "run"), preset="tiny", overrides=["rl=[rloo]"])
    steps = [s["step"] for s in json.loads((run / "pipeline.json").read_text())["steps"]]
    assert "rloo" in steps and steps[-1] == "report"
    assert (run / "rloo/model/config.json").is_file() and (run / "report.html").is_file()


def test_run_pipeline_survives_the_pipeline_module_being_imported():
    import preflab.pipeline  # noqa: F401  (sets the package attribute `pipeline` to the module)

    assert callable(preflab.run_pipeline) and callable(preflab.train)
