"""Typed configs for every stage: pydantic models, loaded from YAML, overridden with dotted keys.

``load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=4"])``

A wrong key, type or range raises ``ConfigError`` naming the key (``optim.lr``), and nothing
starts. Each stage gets only the sections it needs (pass a function what it needs, nothing more).
One module per stage: ``base`` (Section, the shared sections, loading), ``sft``, ``rm``, ``rl``,
``dpo`` (DPO and rejection sampling) and ``pipeline``; every name is importable from here.
The RL stage's classes of 0.2 (``PPOConfig`` and friends, ``rl.RENAMED``) still import from
here and from ``preflab.config.rl``, with a ``DeprecationWarning``.
"""

from preflab.config.base import *  # noqa: F403
from preflab.config.base import __all__ as _base
from preflab.config.dpo import *  # noqa: F403
from preflab.config.dpo import __all__ as _dpo
from preflab.config.pipeline import *  # noqa: F403
from preflab.config.pipeline import __all__ as _pipeline
from preflab.config.rl import *  # noqa: F403
from preflab.config.rl import __all__ as _rl
from preflab.config.rl import renamed as _renamed
from preflab.config.rm import *  # noqa: F403
from preflab.config.rm import __all__ as _rm
from preflab.config.sft import *  # noqa: F403
from preflab.config.sft import __all__ as _sft

__all__ = [*_base, *_sft, *_rm, *_rl, *_dpo, *_pipeline]


def __getattr__(name: str):
    return _renamed(globals(), name)  # PPOConfig -> RLConfig, ... (a DeprecationWarning, once)
