"""Hugging Face `datasets` inputs: saved dataset directories and parquet files in the usual TRL
column layouts, read wherever a JSONL file is read (small datasets built here)."""

import json

import pytest

from helpers import run_cli

datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")

from preflab.data.chat import read_demos, read_prompts  # noqa: E402
from preflab.data.hf import is_hf_source, standard_preference  # noqa: E402
from preflab.data.jsonl import read_jsonl  # noqa: E402
from preflab.errors import DataError  # noqa: E402

PAIRS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "Name a bird.", "chosen": "A robin.", "rejected": "A cat."}]
CONV = [{"prompt": [{"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}]


def test_prompts_from_a_saved_dataset_directory(tmp_path):
    rows = [{"id": "a", "prompt": "Say hi."}, {"id": "b", "prompt": [{"role": "user", "content": "Say bye."}]}]
    datasets.Dataset.from_list([{"id": "a", "prompt": "Say hi."}]).save_to_disk(tmp_path / "plain")
    assert is_hf_source(tmp_path / "plain") and not is_hf_source(tmp_path / "nope")
    assert read_prompts(str(tmp_path / "plain")) == [{"id": "a", "prompt": "Say hi."}]
    # TRL's conversational prompt-only layout, in a DatasetDict (its train split is read).
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"id": "b", "prompt": rows[1]["prompt"]}]),
                          "test": datasets.Dataset.from_list([{"id": "c", "prompt": rows[1]["prompt"]}])}
                         ).save_to_disk(tmp_path / "dd")
    assert read_prompts(str(tmp_path / "dd")) == [rows[1]]
    assert read_prompts(str(tmp_path / "dd/test"))[0]["id"] == "c"


def test_demonstrations_from_parquet_in_three_layouts(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    datasets.Dataset.from_list([{"messages": msgs}]).to_parquet(tmp_path / "m.parquet")
    datasets.Dataset.from_list([{"prompt": "Hi", "completion": "Hello"}]).to_parquet(tmp_path / "pc.parquet")
    datasets.Dataset.from_list([{"prompt": msgs[:1], "completion": msgs[1:]}]).to_parquet(tmp_path / "pcc.parquet")
    for name in ("m", "pc", "pcc"):
        assert read_demos(str(tmp_path / f"{name}.parquet")) == [msgs], name


def test_a_directory_of_parquet_files_in_name_order(tmp_path):
    (tmp_path / "d").mkdir()
    for i, row in enumerate(PAIRS):
        datasets.Dataset.from_list([row]).to_parquet(tmp_path / f"d/part-{i}.parquet")
    assert read_jsonl(tmp_path / "d") == PAIRS


def test_a_bad_row_is_named_by_source_and_row(tmp_path):
    datasets.Dataset.from_list([{"prompt": "ok", "response": "fine"}, {"prompt": "ok", "response": ""}]
                               ).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=rf"{tmp_path / 'ds'}:2: 'response' is empty"):
        read_demos(str(tmp_path / "ds"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read as parquet"):
        read_jsonl(tmp_path / "broken.parquet")


def test_conversational_preferences_become_standard_pairs():
    assert standard_preference(PAIRS[0]) is PAIRS[0]
    explicit, implicit = (standard_preference(r) for r in CONV)
    assert explicit == {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away."}
    assert implicit == {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    with pytest.raises(ValueError, match="implicit prompt"):
        standard_preference({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]})


def test_data_import_from_parquet_and_a_dataset_dir(tmp_path):
    from preflab.feedback.store import PreferenceStore

    datasets.Dataset.from_list(PAIRS).to_parquet(tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(CONV).save_to_disk(tmp_path / "conv")
    store = tmp_path / "s.sqlite"
    assert run_cli(["data", "import", "--format", "trl", "--store", str(store), str(tmp_path / "pairs.parquet")]) == 0
    assert run_cli(["data", "import", "--format", "trl-conversational", "--store", str(store), str(tmp_path / "conv")]) == 0
    with PreferenceStore(store) as s:
        got = sorted((r.prompt, r.candidates) for r in s.rankings())
    assert got == sorted([("The sky is", [" blue.", " green."]), ("Name a bird.", ["A robin.", "A cat."]),
                          ("Hi?", ["Hello!", "Go away."]), ("2+2?", ["4", "5"])])


def test_sft_trains_on_a_saved_dataset(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"It is {i}."}]}
            for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "demos")
    args = ["sft", "model.path=tiny:", f"data.train={tmp_path / 'demos'}", "data.val_fraction=0", "train.batch_size=4",
            "train.max_steps=2", "train.bf16=false", "run.progress=false", f"run.out={tmp_path / 'run'}"]
    assert run_cli(args) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and (tmp_path / "run/model/config.json").is_file()
