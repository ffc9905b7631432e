"""The vLLM back end without vLLM: never imported unless chosen, one clear error when chosen and
missing, and the weight sync (LoRA merged, checkpoint names, only after a change) against a fake
engine that generates with the weights it was sent."""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import varied_model
from preflab import models
from preflab.errors import ConfigError
from preflab.generation import vllm as pvllm
from preflab.rollout import HFGenerator, encode_prompts, make_generator

PROMPTS = ["hi", "a much longer prompt with more words", "mid size"]


@pytest.fixture(scope="module")
def varied():
    return varied_model(1)


class FakeModel:
    """vLLM's model object as far as the sync is concerned: ``load_weights(iterable of (name, tensor))``.
    It loads into a transformers model of the same architecture, so the fake engine samples with
    exactly what it was sent."""

    def __init__(self, like):
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(99)  # different weights until synced
            self.hf = AutoModelForCausalLM.from_config(like.config).eval()
        self.loads = 0

    def load_weights(self, weights):
        sd = dict(weights)
        missing, unexpected = self.hf.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embeddings
        assert not any("lora" in k or "base_layer" in k for k in sd)
        self.loads += 1


class FakeLLM:
    def __init__(self, like, tok, route="local"):
        self.model, self.tok, self.calls = FakeModel(like), tok, []
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        if route == "local":
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
        else:
            self.collective_rpc = lambda fn, args=(): [fn(worker, *args)]

    resets = 0

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        """Greedy continuations from the synced weights; EOS left out of token_ids, as a stop token may be."""
        self.calls.append(params)
        gen = HFGenerator(self.model.hf, self.tok)
        outs = []
        for p in prompts:
            s = gen.generate([p["prompt_token_ids"]], max_new_tokens=params["max_tokens"], temperature=0.0)
            ids = s.response[0][s.response_mask[0].bool()].tolist()
            stop = bool(s.ended[0])
            ids = ids[:-1] if stop else ids
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop" if stop else "length")
                                                 for _ in range(params["n"])]))
        return outs


def sampling_params(**kw):
    return kw


def test_vllm_is_not_imported_unless_chosen():
    code = ("import sys, torch; from preflab import models; from preflab.rollout import make_generator, encode_prompts;"
            "import preflab.stages.rl, preflab.generation.vllm;"
            "m, t = models.load_policy('tiny:'), models.load_tokenizer('tiny:');"
            "make_generator(m, t, backend='hf').generate(encode_prompts(t, ['hi']), max_new_tokens=2, temperature=1.0);"
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_choosing_vllm_without_it_installed_is_one_clear_error(varied, monkeypatch):
    model, tok = varied
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    with pytest.raises(ConfigError, match=r"rollout.backend is 'vllm'.*preflab\[vllm\]"):
        make_generator(model, tok, backend="vllm")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator(model, tok, backend="tgi")


def test_config_selects_the_backend():
    from preflab.config import Rollout

    assert Rollout().backend == "hf" and Rollout(backend="vllm").backend == "vllm"
    with pytest.raises(Exception, match="backend"):
        Rollout(backend="tgi")


@pytest.mark.parametrize("route", ["local", "rpc"])
def test_weights_sync_after_each_update_lora_merged(varied, route):
    model, tok = varied
    policy = models.wrap_lora(copy.deepcopy(model), models.LoraOptions(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    llm = FakeLLM(model, tok, route)
    gen = make_generator(policy, tok, backend="vllm", llm=llm, sampling_params=sampling_params)
    prompts = encode_prompts(tok, PROMPTS)
    want = HFGenerator(policy, tok).generate(prompts, max_new_tokens=12, temperature=0.0)
    got = gen.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert llm.model.loads == 1
    assert torch.equal(got.response, want.response) and got.texts == want.texts  # the engine has the merged weights
    assert torch.equal(got.ended, want.ended)
    gen.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert llm.model.loads == 1  # nothing changed: no copy

    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    for p in policy.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 0.3
    opt.step()  # a policy update, in place
    want2 = HFGenerator(policy, tok).generate(prompts, max_new_tokens=12, temperature=0.0)
    assert not torch.equal(want2.response, want.response)
    got2 = gen.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert llm.model.loads == 2 and torch.equal(got2.response, want2.response)
    assert llm.resets == 2  # the prefix cache (keys and values of the old weights) is dropped with every copy


def test_sampling_parameters_and_row_layout(varied):
    model, tok = varied
    llm = FakeLLM(model, tok)
    gen = make_generator(model, tok, backend="vllm", llm=llm, sampling_params=sampling_params)
    prompts = encode_prompts(tok, PROMPTS[:2])
    torch.manual_seed(0)
    s = gen.generate(prompts, max_new_tokens=6, temperature=0.7, top_k=0, top_p=0.9, min_new_tokens=2, n=3)
    params = llm.calls[-1]
    assert params["n"] == 3 and params["top_k"] == -1 and params["top_p"] == 0.9 and params["temperature"] == 0.7
    assert params["min_tokens"] == 2 and params["max_tokens"] == 6 and params["stop_token_ids"] == [tok.eos_token_id]
    assert s.query.shape[0] == 6
    for r in range(6):
        assert s.query[r][s.query_mask[r].bool()].tolist() == prompts[r // 3]
    torch.manual_seed(0)
    gen.generate(prompts, max_new_tokens=6, temperature=0.7)
    assert llm.calls[-1]["seed"] == params["seed"]  # seeded from torch's global RNG: repeatable


def test_hf_weights_names_match_the_checkpoint(varied):
    model, _ = varied
    policy = models.wrap_lora(copy.deepcopy(model), models.LoraOptions(r=2))
    names = dict(pvllm.hf_weights(policy))
    assert set(names) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():  # lora_B starts at zero: merged weights equal the base
        torch.testing.assert_close(names[n], p)
