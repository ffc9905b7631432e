"""End-to-end checks on the real model (SmolLM2-135M-Instruct). `make test-slow`."""

import time

import pytest
import torch

pytestmark = pytest.mark.slow

BUNDLED = "bundled:smollm2-135m-instruct"


def test_bundled_model_loads_fast_and_generates():
    from preflab import models
    from preflab.rollout import generate_texts

    models.resolve(BUNDLED)  # converts once if the cache is empty
    t0 = time.perf_counter()
    tok = models.load_tokenizer(BUNDLED)
    model = models.load_policy(BUNDLED)
    assert time.perf_counter() - t0 < 10  # reads the cached safetensors directory
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(0)
    out = generate_texts(model, tok, ["What is the capital of France?"], max_new_tokens=12, temperature=0.0)
    assert "Paris" in out[0]


def test_sft_on_the_real_model_saves_a_plain_transformers_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from preflab.config import SFTConfig, load_config
    from preflab.stages import sft

    cfg = load_config(SFTConfig, "configs/sft.yaml", [f"run.out={tmp_path}", "train.max_steps=2",
                                                      "run.progress=false"])
    out = sft.train(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152
