"""Forward passes of a causal LM that compute only what a loss needs.

The vocabulary projection is the most expensive matrix product of a small model (SmolLM2:
576 x 49,152). ``TokenNLL`` runs the decoder once and applies the output layer only at the
positions that carry a label, so prompt tokens cost no logits at all.
"""

from __future__ import annotations

import torch
from torch import nn

from preflab.data.chat import IGNORE


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under DDP and peft wrappers (adapters stay active)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last hidden states of the decoder trunk; no logits computed."""
    base = unwrap(model)
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


class TokenNLL(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> (nll_sum, n_tokens)``.

    Position t predicts token t+1 (labels are aligned with input_ids, as transformers does).
    Returning the sum and the count lets a caller normalise by the token count of the whole
    optimizer step across micro-batches and ranks, which makes gradient accumulation exact.
    Wrap this module (not the bare model) in DDP so gradient hooks see one forward per step.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = decoder_hidden(self.model, input_ids, attention_mask)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        h = hidden[:, :-1][keep]
        logits = unwrap(self.model).get_output_embeddings()(h).float()
        nll = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        return nll, keep.sum()
