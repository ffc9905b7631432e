"""Shared test helpers: tiny configs and demonstration files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def write_demos(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Say the number {i}.", "response": f"The number is {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
