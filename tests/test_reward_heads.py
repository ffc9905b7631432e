"""Reward heads on one trunk (``rm.train.heads``): the bootstrap loss by hand, the stage's wiring
(each head's own counts, its own normalisation, 1x8 == 8x1), the saved model in plain
transformers, and the places an ensemble is read (RL reward, uncertainty, rm-eval, the critic)."""

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import free_port, max_param_diff, model_weights
from preflab import models, reward_heads, rl_update, scoring
from preflab.data import rankings
from preflab.errors import ConfigError
from preflab.evals import rm_eval
from preflab.rl import ranking
from preflab.stages import reward
from test_reward import EXACT, WORDS, _ddp_worker, rm_cfg, write_mixed, write_rankings


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The loss and the counts
# ---------------------------------------------------------------------------------------------


def test_heads_loss_is_each_heads_counted_prompt_losses_averaged_over_heads():
    """Two prompts (K = 2, 3), two heads. Prompt losses by hand: head 0 [softplus(-1), (softplus(-2) +
    softplus(-1) + softplus(-1)) / 3], head 1 [softplus(1), ...]; counts [[2, 0], [1, 3]]; the total
    is (2 l00 + 1 l10 + 0 l01 + 3 l11) / 2. Accuracy and pairs are the heads' mean's."""
    sp = torch.nn.functional.softplus
    enc = [rankings.Encoded([[1], [2]], [0, 1]), rankings.Encoded([[3], [4], [5]], [0, 1, 2])]
    batch = scoring.collate_groups(enc, 0)
    head0 = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    head1 = torch.tensor([0.0, 1.0, 0.0, 0.0, 3.0])
    weights = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    parts = ranking.ranking_loss(torch.stack([head0, head1], 1), batch["ranks"], batch["valid"], "kway", weights)
    l00, l10 = sp(torch.tensor(-1.0)), (sp(torch.tensor(-1.0)) * 2 + sp(torch.tensor(-2.0))) / 3
    l01, l11 = sp(torch.tensor(1.0)), (sp(torch.tensor(0.0)) + sp(torch.tensor(3.0)) * 2) / 3
    assert float(parts.total) == pytest.approx(float(2 * l00 + 1 * l10 + 0 * l01 + 3 * l11) / 2, rel=1e-6)
    # mean rewards [.5, .5], [1, .5, 1.5]: prompt 0 tied (not correct), prompt 1 right on 1 of 3 pairs
    assert (parts.n_prompts, parts.n_pairs, parts.n_correct) == (2, 4, 1)
    # without counts every prompt weighs 1 in every head; one column is a plain one-head loss
    plain = ranking.ranking_loss(torch.stack([head0, head1], 1), batch["ranks"], batch["valid"])
    assert float(plain.total) == pytest.approx(float(l00 + l10 + l01 + l11) / 2, rel=1e-6)
    assert float(ranking.ranking_loss(head0, batch["ranks"], batch["valid"]).total) == pytest.approx(float(l00 + l10))
    assert "weights" in scoring.collate_groups([rankings.Encoded([[1], [2]], [0, 1], [1.0, 2.0])], 0)
    assert "weights" not in scoring.scorer_inputs(scoring.collate_groups([rankings.Encoded([[1], [2]], [0, 1],
                                                                                           [1.0, 2.0])], 0))


def test_bootstrap_counts_are_fixed_by_seed_and_index_and_poisson_one():
    a = reward_heads.bootstrap_weights(4000, 3, seed=7)
    assert a == reward_heads.bootstrap_weights(4000, 3, seed=7) != reward_heads.bootstrap_weights(4000, 3, seed=8)
    assert reward_heads.bootstrap_weights(10, 1, seed=7) is None
    t = torch.tensor(a)
    assert t.shape == (4000, 3) and bool((t == t.round()).all()) and float(t.min()) == 0
    assert float(t.mean()) == pytest.approx(1.0, abs=0.05) and float(t.var()) == pytest.approx(1.0, abs=0.1)
    assert float((t == 0).float().mean()) == pytest.approx(0.368, abs=0.03)  # e^-1 of the rankings left out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_rm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    data = write_rankings(tmp / "rank.jsonl", 80)
    demos = tmp / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "response": f"zebra {WORDS[i]} stone"})
                             + "\n" for i in range(6)))
    cfg = rm_cfg(tmp, data, "data.val_fraction=0.2", "train.batch_prompts=8", "train.max_steps=16",
                 f"data.demos={demos}", "train.heads=3")
    return reward.train(cfg), demos


def _demo_rows(demos):
    rows = [json.loads(line) for line in open(demos)]
    return [d["prompt"] for d in rows], [d["response"] for d in rows]


def test_three_heads_learn_apart_each_normalised_to_the_demos(heads_rm):
    out, demos = heads_rm
    report = json.loads((out.parent / "eval" / "rm_eval.json").read_text())
    assert report["accuracy"] >= 0.95
    ens = report["ensemble"]  # each head's held-out accuracy and their disagreement
    assert ens["members"] == ["head0", "head1", "head2"] and len(ens["member_accuracy"]) == 3
    assert ens["n_pairs"] == report["n_pairs"] and ens["mean_uncertainty"] > 0
    rm = models.load_reward_model(str(out))
    assert reward_heads.head_count(rm) == 3 and models.saved_heads(str(out)) == 3
    w = rm.score.linear.weight.detach()
    assert float((w[0] - w[1]).abs().max()) > 1e-3 and float((w[1] - w[2]).abs().max()) > 1e-3
    assert rm.config.preflab_reward_gain == 1.0 and rm.config.preflab_reward_bias == 0.0
    biases = rm.config.preflab_reward_head_bias
    assert len(biases) == 3 and len(set(biases)) == 3  # each head its own bias
    tok = models.load_tokenizer(str(out))
    prompts, responses = _demo_rows(demos)
    with reward_heads.head_mode(rm, "members"):
        members = torch.tensor(scoring.score_texts(rm, tok, prompts, responses, max_length=96, normalise=True))
    assert members.shape == (6, 3)
    torch.testing.assert_close(members.mean(0), torch.zeros(3), atol=1e-4, rtol=0)  # demos' mean 0 per head
    mean = torch.tensor(scoring.score_texts(rm, tok, prompts, responses, max_length=96, normalise=True))
    torch.testing.assert_close(mean, members.mean(1), atol=1e-5, rtol=1e-5)  # the model's score: the heads' mean
    with reward_heads.head_mode(rm, "raw"):
        raw = torch.tensor(scoring.score_texts(rm, tok, prompts, responses, max_length=96))
    torch.testing.assert_close(members, raw + torch.tensor(biases), atol=1e-5, rtol=1e-5)


def test_each_head_trains_only_on_its_own_counts(tmp_path, monkeypatch):
    """Head 1 counts every ranking 0 times: it keeps its initial weights while head 0 moves."""
    monkeypatch.setattr(reward_heads, "bootstrap_weights", lambda n, heads, seed: [[1.0, 0.0]] * n)
    data = write_mixed(tmp_path / "m.jsonl")
    out = reward.train(rm_cfg(tmp_path, data, "train.heads=2", "train.batch_prompts=8", "train.max_steps=2"))
    torch.manual_seed(0)
    init = models.load_scorer("tiny:", heads=2).score.linear.weight.detach()
    trained = models.load_scorer(str(out)).score.linear.weight.detach()
    assert float((trained[0] - init[0]).abs().max()) > 1e-4
    torch.testing.assert_close(trained[1], init[1], atol=0, rtol=0)


def test_heads_gradient_accumulation_1x8_equals_8x1(tmp_path):
    data = write_mixed(tmp_path / "m.jsonl")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wa = model_weights(reward.train(rm_cfg(tmp_path / "a", data, *EXACT, "train.heads=3", "train.batch_prompts=8",
                                           "train.max_steps=2")))
    wb = model_weights(reward.train(rm_cfg(tmp_path / "b", data, *EXACT, "train.heads=3", "train.batch_prompts=1",
                                           "train.grad_accum=8", "train.max_steps=2")))
    assert wa["score.weight"].shape[0] == 3
    assert max_param_diff(wa, wb) < 2e-6


def test_heads_need_the_whole_model_and_the_same_count_to_start_from(tmp_path, heads_rm):
    data = write_mixed(tmp_path / "m.jsonl")
    for bad in (["model.lora.enabled=true"], ["train.parallel=fsdp"]):
        with pytest.raises(ConfigError, match="train.heads: 2 heads need the whole model"):
            rm_cfg(tmp_path, data, "train.heads=2", *bad)
    out, _ = heads_rm
    with pytest.raises(ConfigError, match="train.heads: 1, but .* reward model with 3 heads"):
        reward.train(rm_cfg(tmp_path, data, f"model.path={out}", "train.max_steps=1"))


# ---------------------------------------------------------------------------------------------
# Where the ensemble is read
# ---------------------------------------------------------------------------------------------


def test_plain_transformers_reads_the_raw_heads_and_apply_reward_norm_gives_their_mean(heads_rm):
    from transformers import AutoModelForSequenceClassification

    out, demos = heads_rm
    prompts, responses = _demo_rows(demos)
    tok = models.load_tokenizer(str(out))
    ours = models.load_reward_model(str(out))
    seqs = [rankings.encode_pair(tok, p, r, 96) for p, r in zip(prompts, responses)]
    batch = scoring.collate_groups([rankings.Encoded(seqs, [0] * len(seqs))], tok.pad_token_id)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        hf_raw = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with reward_heads.head_mode(ours, "raw"):
        raw = torch.tensor(scoring.score_texts(ours, tok, prompts, responses, max_length=96))
    torch.testing.assert_close(hf_raw, raw, atol=1e-5, rtol=1e-5)
    folded = models.apply_reward_norm(hf)
    with torch.no_grad():
        one = folded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    mean = torch.tensor(scoring.score_texts(ours, tok, prompts, responses, max_length=96, normalise=True))
    torch.testing.assert_close(one, mean, atol=1e-5, rtol=1e-5)


def test_the_rl_reward_uncertainty_and_rm_eval_read_each_head_as_a_member(heads_rm, tmp_path):
    out, demos = heads_rm
    prompts, responses = _demo_rows(demos)
    rm = models.load_reward_model(str(out))
    tok = models.load_tokenizer(str(out))
    with reward_heads.head_mode(rm, "members"):
        members = scoring.score_texts(rm, tok, prompts, responses, max_length=96, normalise=True)
    # ensemble_text_scores (the gate's and the rounds' uncertainty): a row per head
    rows = scoring.ensemble_text_scores([str(out)], prompts, responses, max_length=96)
    assert torch.tensor(rows).shape == (3, 6)
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(members).T, atol=1e-5, rtol=1e-5)
    # the RL stage's reward function: (heads, B) member scores, with another RM's appended
    from preflab.data.chat import render_prompt
    from preflab.rollout import Samples, left_pad

    q = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    seqs = [rankings.encode_pair(tok, p, r, 96) for p, r in zip(prompts, responses)]
    query, query_mask = left_pad(q, tok.pad_token_id)
    resp = scoring.collate_groups([rankings.Encoded([s[len(qq):] for s, qq in zip(seqs, q)], [0] * 6)],
                                  tok.pad_token_id)
    samples = Samples(query, query_mask, resp["input_ids"], resp["attention_mask"], torch.ones(6, dtype=torch.bool),
                      responses)
    with torch.no_grad():
        got = rl_update.ensemble_reward([rm])(samples)
        both = rl_update.ensemble_reward([rm, models.load_reward_model("tiny:")])(samples)
    torch.testing.assert_close(got, torch.tensor(members).T, atol=1e-4, rtol=1e-4)
    assert both.shape == (4, 6) and reward_heads.heads_of(rm).mode == "mean"  # the mode is put back
    # a run whose RM has heads is an ensemble for the gate and the audit
    run = tmp_path / "run"
    (run / "rm").mkdir(parents=True)
    (run / "rm" / "model").symlink_to(out)
    assert scoring.run_reward_ensemble(run) == [str(run / "rm" / "model")]
    # rm-eval: one model with three heads reports an ensemble of three members
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "responses": [f"zebra {i} apple",
                                                                                     f"river {i}"],
                                        "order": [[0], [1]]}) + "\n" for i in range(4)))
    res = CliRunner().invoke(rm_eval.cli, ["--model", str(out), "--data", str(data), "--max-length", "96",
                                           "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    ens = json.loads((tmp_path / "e.json").read_text())["ensemble"]
    assert ens["members"] == [f"{out}#head{m}" for m in range(3)] and len(ens["member_accuracy"]) == 3


def test_the_critic_from_a_heads_rm_starts_at_their_mean(heads_rm):
    out, demos = heads_rm
    prompts, responses = _demo_rows(demos)
    tok = models.load_tokenizer(str(out))
    critic = models.apply_reward_norm(models.load_reward_model(str(out)))
    assert reward_heads.heads_of(critic) is None and critic.score.out_features == 1
    mean = scoring.score_texts(models.load_reward_model(str(out)), tok, prompts, responses, max_length=96,
                               normalise=True)
    assert scoring.score_texts(critic, tok, prompts, responses, max_length=96) == pytest.approx(mean, abs=1e-5)


def test_heads_on_two_gloo_ranks_equal_one_rank(tmp_path):
    """The counts travel with the rankings, so each rank's slice weighs them as one process does."""
    data = write_mixed(tmp_path / "m.jsonl", n=20)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    w_one = model_weights(reward.train(rm_cfg(tmp_path / "one", data, *EXACT, "train.heads=3",
                                              "train.batch_prompts=8", "train.max_steps=2")))
    two = rm_cfg(tmp_path / "two", data, *EXACT, "train.heads=3", "train.batch_prompts=4", "train.max_steps=2")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), two.model_dump_json()), nprocs=2)
    assert max_param_diff(w_one, model_weights(tmp_path / "two/run/model")) < 1e-5
