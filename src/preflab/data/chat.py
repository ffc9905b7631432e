"""Demonstrations: parsing, chat rendering, response-only labels, collation and packing.

A demonstration is a conversation (OpenAI chat format) whose assistant turns are the targets.
Rendering uses the tokenizer's chat template; labels are -100 everywhere except on the tokens of
assistant turns (their content and end-of-turn token), found through character offsets so no
tokenizer boundary quirk can shift them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preflab.data.jsonl import read_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant")
EXAMPLES = Path(__file__).parent / "examples" / "demos.jsonl"


def parse_demo(obj: Any) -> list[dict[str, str]]:
    """``{"prompt", "response"}``, ``{"messages": [...]}`` or TRL's ``{"prompt", "completion"}`` (strings
    or message lists) -> a message list ending with the assistant."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be from the assistant (it is the demonstration)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "completion" in obj and "prompt" in obj:  # TRL's prompt-completion layout
        prompt, completion = obj["prompt"], obj["completion"]
        msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else _message_list(prompt, "prompt"))
        if isinstance(completion, str):
            if not completion.strip():
                raise ValueError("'completion' is empty")
            return msgs + [{"role": "assistant", "content": completion}]
        done = _message_list(completion, "completion")
        if done[-1]["role"] != "assistant":
            raise ValueError("the completion's last message must be from the assistant")
        return msgs + done
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{key!r} must be a string" if key in obj else f"missing key {key!r}")
        if not obj["response"].strip():
            raise ValueError("'response' is empty")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    raise ValueError("expected keys 'prompt' and 'response', or 'messages'")


def _message_list(v: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{key!r} must be a string or a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{key}[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def read_demos(path: str) -> list[list[dict[str, str]]]:
    """Read demonstrations; ``builtin:examples`` is the small set shipped with preflab."""
    if path == "builtin:examples":
        path = str(EXAMPLES)
    return read_jsonl(path, parse_demo)


def prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text the model sees before it answers (chat template with the generation prompt)."""
    return tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True, tokenize=False)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Example:
    """Token ids of the rendered conversation; labels only on assistant turns; truncated to max_length."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(before), len(upto.rstrip("\n"))))  # the turn, up to its end-of-turn token
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for tok, (start, _end) in zip(ids, offsets)
    ]
    return Example(ids, labels)


def collate(examples: list[Example], pad_id: int):
    """Right-pad a micro-batch -> dict of (B, T) tensors: input_ids, attention_mask, labels."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy packing of whole examples into rows of at most ``max_length`` tokens.

    Packed examples attend to earlier ones in the same row (no block-diagonal mask); labels of
    each example are unchanged, so the loss still counts response tokens only.
    """
    rows: list[Example] = []
    cur = Example([], [])
    for e in examples:
        if cur.input_ids and len(cur.input_ids) + len(e.input_ids) > max_length:
            rows.append(cur)
            cur = Example([], [])
        cur.input_ids += e.input_ids
        cur.labels += e.labels
    if cur.input_ids:
        rows.append(cur)
    return rows


MAX_TOKEN_BUDGET = 4096


def check_token_budget(value: Any) -> int | None:
    """A prompt row's ``max_new_tokens`` (None: the caller's default); raises ValueError if invalid."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKEN_BUDGET:
        raise ValueError(f"'max_new_tokens' must be an integer from 1 to {MAX_TOKEN_BUDGET}, got {value!r}")
    return value


def token_budget(row: Any, default: int) -> int:
    """How many new tokens to sample for one prompt row (a dict or a ``SuitePrompt``): its own
    ``max_new_tokens`` when it has one (long-form tasks), else ``default``."""
    own = row.get("max_new_tokens") if isinstance(row, dict) else getattr(row, "max_new_tokens", None)
    return own or default


def token_budgets(rows: list[Any], default: int) -> int | list[int]:
    """``token_budget`` of each row; the plain ``default`` when no row has its own."""
    budgets = [token_budget(row, default) for row in rows]
    return budgets if any(b != default for b in budgets) else default


def parse_prompt_row(obj: Any) -> dict[str, Any]:
    """A prompt row: ``{"prompt": str}``, ``{"prompt": [messages]}`` (TRL) or ``{"messages": [...]}`` plus
    any metadata (id, split, ``max_new_tokens``: its own sampling budget, ...)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    check_token_budget(obj.get("max_new_tokens"))
    if isinstance(obj.get("prompt"), str):
        if not obj["prompt"].strip():
            raise ValueError("'prompt' is empty")
        return obj
    if isinstance(obj.get("prompt"), list):  # TRL's conversational prompt-only layout
        return {**obj, "prompt": _message_list(obj["prompt"], "prompt")}
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
        return {**obj, "prompt": msgs}
    raise ValueError("each row needs 'prompt' (a string) or 'messages' (a list)")


def read_prompts(path: str, split: str | None = None) -> list[dict[str, Any]]:
    """Prompt rows of a JSONL file (suite format or plain), keeping those of ``split`` when given."""
    rows = read_jsonl(path, parse_prompt_row)
    if split is not None and any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") == split]
    return rows


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> Example:
    """A plain text for language modelling: every token is a target (PPO-ptx pretraining rows)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    return Example(ids, list(ids))


def read_lm_rows(path: str, tokenizer: Any, max_length: int) -> list[Example]:
    """Rows of ``{"text"}`` (all tokens count) or demonstrations (response tokens count)."""

    def parse(obj: Any) -> Example:
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            return tokenize_text(tokenizer, obj["text"], max_length)
        return tokenize_conversation(tokenizer, parse_demo(obj), max_length)

    if path == "builtin:examples":
        path = str(EXAMPLES)
    return [e for e in read_jsonl(path, parse) if any(label != IGNORE for label in e.labels[1:])]
