"""Evaluate models on held-out prompts against a reference (SFT) model, with the gold judge.

``evaluate(models, prompts, reference="sft", reward_model=..., out_dir=...)``:

1. **generate** one response per prompt and model (temperature ``temperature``), cached in
   ``out_dir/generations/NAME.jsonl`` row by row, so a killed evaluation resumes where it
   stopped; rows made with other settings (model spec, temperature, max_new_tokens) are redone;
2. **judge** every response with the gold judge (``feedback.rubric``);
3. **KL to the reference** on the model's own samples: mean over prompts of
   ``log p_model(y|x) - log p_ref(y|x)`` (token log-ratios summed over the response, EOS
   included when the response ended). Both models' logits are divided by the sampling
   temperature, as during PPO (docs/reference.md §2.3, §8.4), so this is a Monte Carlo estimate of
   KL(p_model,T || p_ref,T) for the distribution the samples came from (T = 1 when sampling
   is greedy). The log-probs are those of the sampled token ids (kept in the generation
   cache); a reference with another vocabulary scores the re-tokenized text. The
   reference's own KL is 0;
4. **RM scores** (optional): ``scoring.reward_scores`` on rendered prompt + response + EOS,
   with the RM's stored gain and bias;
5. **metrics** (``evals.metrics``): gold and RM win rates against the reference (ties count
   half, Wilson 95% interval; the two can disagree, which is the point), length, diversity,
   toxicity proxy, refusal rates, InstructGPT metadata, failure bins, MC1 truthfulness proxy.

Only one model is in memory at a time; the reference is handled last so it scores the
other models' samples while it is loaded.

``out_dir/results.json`` (written atomically from ``evals.results.EvalResults``, which types
every block below; ``evals.results.load`` reads it back)::

    {
      "version": 1,
      "reference": "sft", "n_prompts": N, "reward_model": PATH | null,
      "settings": {"max_new_tokens", "temperature", "seed", "kl_temperature"},
      "thresholds": {"rm_high": RM-score 75% quantile | null, "gold_low": gold 25% quantile | null},
      "models": {NAME: {
          "spec": PATH, "n": N,
          "gold": {"total", "attempts", "constraints", "refusal", "truthful", "degenerate"},  # means
          "win_rate": {"rate", "wins", "ties", "losses", "n", "lo", "hi"},      # gold, vs reference
          "rm_win_rate": {... same ...} | null, "rm_score": mean | null,
          "kl": mean nats per response, "kl_per_token": kl / mean tokens,
          "length_words": {"n", "mean", "max", "q10", "q50", "q90", "hist": {"edges", "counts"}},
          "length_tokens": {... same ...}, "no_eos_fraction",
          "distinct_1", "distinct_2", "repeated_trigram_rate",
          "toxicity_proxy": fraction with a profane word (better_profanity list; a PROXY),
          "refusal": {"by_slice": {SLICE: {"rate", "n"}}, "by_category": {CAT: {"rate", "n"}},
                      "harmful", "over_refusal", "ordinary"},
          "metadata": {"attempts", "follows_constraints", "appropriate"},
          "mc1": {"mc1": fraction | null, "n"}}},
      "failure_bins": {NAME: {BIN: {"metric", "count", "n", "description", "examples": [...]}}},
      "examples": [{"id", "prompt", "slice", "responses": {NAME: {"response", "gold_total", "rm_score"}}}],
      "ifeval": {...}  # only when `preflab eval --ifeval` wrote to the same file (kept by a rerun)
    }

``out_dir/samples.jsonl``: one row per model and prompt: ``model, id, prompt, slice, category,
paraphrase_group, response, ended, words, tokens, gold`` (``Judgement.as_dict()``), ``rm_score``,
``toxic``, ``logprob``, ``ref_logprob``, ``kl`` (``tokens`` counts the sampled tokens, EOS included;
``words`` is ``metrics.count_words``; the reference's ``logprob`` and ``ref_logprob`` are null).

``out_dir/generations/NAME.jsonl``: ``id, response, ended, tokens, token_ids, spec, max_new_tokens,
temperature`` per prompt, appended as batches finish.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preflab.config import EvalSection
from preflab.data.jsonl import write_jsonl
from preflab.data.suite.schema import SLICES, SuitePrompt
from preflab.errors import PreflabError
from preflab.evals import metrics as M
from preflab.evals import results as R

__all__ = ["evaluate"]

GOLD_KEYS = ("total", "attempts", "constraints", "refusal", "truthful", "degenerate")
N_EXAMPLES = 8


# ---------------------------------------------------------------------------------------------
# Generation with a resumable cache
# ---------------------------------------------------------------------------------------------


def _read_cache(path: Path, settings: dict[str, Any], ids: set[str]) -> tuple[dict[str, dict[str, Any]], bool]:
    """Rows of a generation cache made with ``settings``, and whether every line was such a row.

    A torn last line (a killed run), a row of other settings or of another prompt is dropped.
    """
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows, False
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(row, dict) and row.get("id") in ids and isinstance(row.get("token_ids"), list)
                and all(row.get(k) == v for k, v in settings.items())):
            rows[row["id"]] = row
    return rows, len(rows) == len(lines)


def _generate(model: Any, tokenizer: Any, prompts: Sequence[SuitePrompt], path: Path, settings: dict[str, Any], *,
              max_new_tokens: int, temperature: float, batch_size: int, seed: int, bf16: bool,
              progress: bool, label: str) -> dict[str, dict[str, Any]]:
    """One response per prompt ({id, response, ended, tokens, **settings}); rows already in the cache
    are reused and new ones are appended batch by batch."""
    import torch

    from preflab.data.chat import token_budget
    from preflab.rollout import HFGenerator, encode_prompts
    from preflab.run import Progress

    cached, clean = _read_cache(path, settings, {p.id for p in prompts})
    if not clean:  # keep only the usable rows, so stale or torn lines never mix with new ones
        write_jsonl(path, cached.values())
    todo = [p for p in prompts if p.id not in cached]
    if not todo:
        return cached
    torch.manual_seed(seed)
    gen = HFGenerator(model, tokenizer, bf16=bf16)
    ids = encode_prompts(tokenizer, [p.prompt for p in todo])
    order = sorted(range(len(todo)), key=lambda i: len(ids[i]))
    with Progress(len(todo), f"generate {label}", enabled=progress) as bar, path.open("a", encoding="utf-8") as f:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            out = gen.generate([ids[i] for i in chunk], max_new_tokens=[token_budget(todo[i], max_new_tokens)
                                                                        for i in chunk], temperature=temperature)
            for j, i in enumerate(chunk):
                token_ids = out.response[j][out.response_mask[j].bool()].tolist()
                row = {"id": todo[i].id, "response": out.texts[j], "ended": bool(out.ended[j]),
                       "tokens": len(token_ids), "token_ids": token_ids, **settings}
                cached[row["id"]] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(advance=len(chunk))
    return cached


# ---------------------------------------------------------------------------------------------
# RM scores
# ---------------------------------------------------------------------------------------------


def _rm_scores(spec: str, prompts: Sequence[str], texts: dict[str, list[str]], *, batch_size: int,
               bf16: bool, progress: bool, seed: int = 0) -> dict[str, list[float | None]]:
    """``scoring.reward_scores`` of rendered prompt + response + EOS (last real token, gain and bias),
    per model. Each model's responses are batched on their own, so a model's scores do not depend
    on which other models are evaluated with it (padding changes float rounding)."""
    import torch

    from preflab import models
    from preflab.evals.truthfulness import batch_samples, response_samples
    from preflab.run import Progress
    from preflab.scoring import reward_scores

    tokenizer = models.load_tokenizer(spec)
    torch.manual_seed(seed)  # a causal-LM checkpoint gets a new random head: make it the same every run
    rm = models.load_reward_model(spec, dtype="bf16" if bf16 else "fp32")  # bf16: no per-call weight casts
    rm.eval()
    device = next(rm.parameters()).device
    result: dict[str, list[float | None]] = {}
    with Progress(len(prompts) * len(texts), "reward model", enabled=progress) as bar, torch.no_grad():
        for name, responses in texts.items():
            rows = response_samples(tokenizer, prompts, responses, eos=True)
            order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
            out: list[float | None] = [None] * len(rows)
            for s in range(0, len(order), batch_size):
                chunk = order[s:s + batch_size]
                samples = batch_samples([rows[i] for i in chunk], tokenizer.pad_token_id, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    scores = reward_scores(rm, samples)
                for i, v in zip(chunk, scores.float().tolist()):
                    out[i] = float(v)
                bar.update(advance=len(chunk))
            result[name] = out
    del rm
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# Metrics of one model
# ---------------------------------------------------------------------------------------------


def _model_metrics(spec: str, rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]],
                   mc1: dict[str, Any]) -> R.ModelResults:
    texts = [r["response"] for r in rows]
    gold = [r["gold"]["total"] for r in rows]
    has_rm = all(r["rm_score"] is not None for r in rows + ref_rows)
    kl = float(np.mean([r["kl"] for r in rows]))
    tokens = [r["tokens"] for r in rows]
    return R.ModelResults(
        spec=spec,
        n=len(rows),
        gold=R.GoldMeans(**{k: float(np.mean([r["gold"][k] for r in rows])) for k in GOLD_KEYS}),
        win_rate=R.WinRate(**M.gold_win_rate(gold, [r["gold"]["total"] for r in ref_rows])),
        rm_win_rate=R.WinRate(**M.gold_win_rate([r["rm_score"] for r in rows], [r["rm_score"] for r in ref_rows]))
        if has_rm else None,
        rm_score=float(np.mean([r["rm_score"] for r in rows])) if has_rm else None,
        kl=kl,
        kl_per_token=kl / max(float(np.mean(tokens)), 1.0),
        length_words=R.LengthStats.model_validate(M.length_stats([r["words"] for r in rows])),
        length_tokens=R.LengthStats.model_validate(M.length_stats(tokens)),
        no_eos_fraction=float(np.mean([not r["ended"] for r in rows])),
        distinct_1=M.distinct_n(texts, 1),
        distinct_2=M.distinct_n(texts, 2),
        repeated_trigram_rate=M.repeated_ngram_rate(texts, 3),
        toxicity_proxy=float(np.mean([r["toxic"] for r in rows])),
        refusal=R.Refusal.model_validate(
            {**M.refusal_rates([r["slice"] for r in rows], texts),
             "by_category": M.rate_by([r["category"] for r in rows], [M.is_refusal(t) for t in texts])}),
        metadata=R.Metadata(**M.metadata_rates(rows)),
        mc1=R.MC1(mc1=mc1["mc1"], n=mc1["n"]),
    )


def _examples(prompts: Sequence[SuitePrompt], by_model: dict[str, list[dict[str, Any]]]) -> list[R.Example]:
    """Up to N_EXAMPLES prompts, taken round-robin over the slices, with every model's response."""
    per_slice = {s: [i for i, p in enumerate(prompts) if p.slice == s] for s in SLICES}
    picked: list[int] = []
    while len(picked) < min(N_EXAMPLES, len(prompts)):
        before = len(picked)
        for s in SLICES:
            if per_slice[s] and len(picked) < N_EXAMPLES:
                picked.append(per_slice[s].pop(0))
        if len(picked) == before:
            break
    return [R.Example(id=prompts[i].id, prompt=prompts[i].prompt, slice=prompts[i].slice,
                      responses={name: R.ExampleResponse(response=rows[i]["response"],
                                                         gold_total=rows[i]["gold"]["total"],
                                                         rm_score=rows[i]["rm_score"])
                                 for name, rows in by_model.items()})
            for i in sorted(picked)]


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


_DEFAULTS = EvalSection()  # the pipeline's eval section: `preflab eval` and evaluate() share its defaults


def evaluate(models: dict[str, str], prompts: list[SuitePrompt], *, reference: str = "sft",
             reward_model: str | None = None, out_dir: str | Path, max_new_tokens: int = _DEFAULTS.max_new_tokens,
             temperature: float = _DEFAULTS.temperature, batch_size: int = _DEFAULTS.batch_size, seed: int = 0,
             progress: bool = True, bf16: bool = _DEFAULTS.bf16) -> dict[str, Any]:
    """Generate, judge and measure every model in ``models`` (name -> model spec) on ``prompts``.

    Writes ``out_dir/results.json``, ``out_dir/samples.jsonl`` and the generation caches
    (schema in the module docstring) and returns the results as that JSON dict
    (``evals.results.EvalResults.to_dict()``; ``EvalResults.from_dict`` types it). An ``"ifeval"``
    block already in ``out_dir/results.json`` is kept. The defaults are ``config.EvalSection``'s.
    """
    from preflab import models as loader
    from preflab.evals.truthfulness import mc1 as mc1_score
    from preflab.evals.truthfulness import response_logprobs, sequence_logprobs
    from preflab.feedback.rubric import judge_batch
    from preflab.rollout import encode_prompts

    if reference not in models:
        raise PreflabError(f"the reference model {reference!r} is not among the models ({', '.join(models)})")
    if not prompts:
        raise PreflabError("no prompts to evaluate")
    if len({p.id for p in prompts}) != len(prompts):
        raise PreflabError("prompt ids must be unique")
    out = Path(out_dir)
    kl_t = temperature if temperature > 0 else 1.0
    by_id = {p.id: p for p in prompts}
    texts: dict[str, list[str]] = {}
    gens: dict[str, list[dict[str, Any]]] = {}
    own_lp: dict[str, list[float]] = {}
    ref_lp: dict[str, list[float]] = {}
    mc1s: dict[str, dict[str, Any]] = {}
    vocabs: dict[str, dict[str, int]] = {}

    # 1-3. generate, own log-probs, MC1; the reference last, scoring everyone's samples.
    for name in [n for n in models if n != reference] + [reference]:
        spec = models[name]
        settings = {"spec": spec, "max_new_tokens": max_new_tokens, "temperature": temperature}
        tokenizer = loader.load_tokenizer(spec)
        model = loader.load_policy(spec, dtype="bf16" if bf16 else "fp32")
        model.eval()
        cache = _generate(model, tokenizer, prompts, out / "generations" / f"{name}.jsonl", settings,
                          max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                          seed=seed, bf16=bf16, progress=progress, label=name)
        gens[name] = [cache[p.id] for p in prompts]
        texts[name] = [g["response"] for g in gens[name]]
        vocabs[name] = tokenizer.get_vocab()
        queries = encode_prompts(tokenizer, [p.prompt for p in prompts])
        for scored in ([n for n in models if n != reference] if name == reference else [name]):
            if vocabs[scored] == vocabs[name]:  # the sampled tokens themselves
                lp = sequence_logprobs(model, [(q, g["token_ids"]) for q, g in zip(queries, gens[scored])],
                                       tokenizer.pad_token_id, batch_size=batch_size, temperature=kl_t, bf16=bf16)
            else:  # another vocabulary: re-tokenize the text (EOS where the response ended)
                lp = response_logprobs(model, tokenizer, [p.prompt for p in prompts], texts[scored], batch_size,
                                       eos=[g["ended"] for g in gens[scored]], temperature=kl_t, bf16=bf16)
            (ref_lp if name == reference else own_lp)[scored] = lp
        mc1s[name] = mc1_score(model, tokenizer, prompts, batch_size, bf16=bf16)
        del model
        gc.collect()

    # 4. reward model scores, all models in one pass over the RM.
    rm: dict[str, list[float | None]] = {n: [None] * len(prompts) for n in models}
    if reward_model is not None:
        rm.update(_rm_scores(reward_model, [p.prompt for p in prompts], texts, batch_size=batch_size, bf16=bf16,
                             progress=progress, seed=seed))

    # 5. per-response rows, then metrics.
    by_model: dict[str, list[dict[str, Any]]] = {}
    for name in models:
        judged = judge_batch(by_id, [{"id": p.id, "response": t} for p, t in zip(prompts, texts[name])])
        rows = []
        for i, (p, g, j) in enumerate(zip(prompts, gens[name], judged)):
            lp = own_lp[name][i] if name != reference else None
            rlp = ref_lp[name][i] if name != reference else None
            rows.append({
                "model": name, "id": p.id, "prompt": p.prompt, "slice": p.slice, "category": p.category,
                "paraphrase_group": p.paraphrase_group, "response": g["response"], "ended": g["ended"],
                "words": M.count_words(g["response"]), "tokens": g["tokens"], "gold": j.as_dict(),
                "rm_score": rm[name][i], "toxic": M.is_profane(g["response"]),
                "logprob": lp, "ref_logprob": rlp, "kl": (lp - rlp) if lp is not None else 0.0,
            })
        by_model[name] = rows

    pooled = [r for rows in by_model.values() for r in rows]
    rm_high = float(np.quantile([r["rm_score"] for r in pooled], 0.75)) if reward_model else None
    gold_low = float(np.quantile([r["gold"]["total"] for r in pooled], 0.25)) if reward_model else None
    ref_words = {r["id"]: r["words"] for r in by_model[reference]}
    results = R.EvalResults(
        version=R.VERSION,
        reference=reference,
        n_prompts=len(prompts),
        reward_model=reward_model,
        settings=R.EvalSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                kl_temperature=kl_t),
        thresholds=R.Thresholds(rm_high=rm_high, gold_low=gold_low),
        models={n: _model_metrics(models[n], by_model[n], by_model[reference], mc1s[n]) for n in models},
        failure_bins={n: {k: R.FailureBin.model_validate(b) for k, b in
                          M.failure_bins(by_model[n], reference_words=ref_words, rm_high=rm_high,
                                         gold_low=gold_low).items()} for n in models},
        examples=_examples(prompts, by_model),
    )
    ifeval = _previous_ifeval(out / "results.json")
    if ifeval is not None:
        results.ifeval = ifeval
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", pooled)
    results.save(out / "results.json")
    return results.to_dict()


def _previous_ifeval(path: Path) -> R.IFEvalResults | None:
    """The ``"ifeval"`` block of an earlier results.json in the same directory, if it has a readable one."""
    try:
        return R.load(path, partial=True).ifeval
    except PreflabError:
        return None
