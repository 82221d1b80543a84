"""Rewards for online post-training, chosen and weighted in the config:

    rewards:
      - {name: exact_match, weight: 1.0}
      - {name: format, weight: 0.2}
      - {name: reward_model, path: ~/rayloop-runs/reward-tiny, weight: 0.5}

They become TRL's `reward_funcs` and `reward_weights`: TRL sums the weighted rewards itself and logs each one
(`rewards/<name>/mean`), and loads a learned reward model from its folder (AutoModelForSequenceClassification).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from rayloop.config import Section

_INTEGER_ONLY = re.compile(r"\s*-?\d+\s*")


class RewardSpec(Section):
    name: Literal["exact_match", "format", "reward_model"]
    """`exact_match`: 1 when the completion is the task's answer; `format`: 1 when it is a bare integer;
    `reward_model`: the score of the reward job's model."""
    weight: float = 1.0
    """Weight of this reward in the sum TRL optimises."""
    path: str | None = None
    """For `reward_model`: the reward job's model (HF folder, checkpoint, or run folder)."""

    @model_validator(mode="after")
    def _path_only_for_reward_model(self):
        if self.name == "reward_model":
            if self.path is None:
                raise ValueError("reward_model needs path: the reward job's model folder or run folder")
            from rayloop.models import resolve_model_folder

            self.path = resolve_model_folder(self.path)
        elif self.path is not None:
            raise ValueError(f"path is only for reward_model, not {self.name}")
        return self


def _text(completion) -> str:
    # Conversational datasets give completions as message lists.
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(completions, answer, **_) -> list[float]:
    """The task's verifiable reward: 1.0 when the completion is exactly the answer."""
    from rayloop.tasks import score

    return [score(_text(c), a) for c, a in zip(completions, answer)]


def integer_format(completions, **_) -> list[float]:
    """A format reward: 1.0 when the completion is one integer and nothing else, right or wrong."""
    return [float(bool(_INTEGER_ONLY.fullmatch(_text(c)))) for c in completions]


def reward_funcs(specs: list[RewardSpec]) -> tuple[list, list[float]]:
    """TRL's `reward_funcs` (functions, or model folders TRL loads) and `reward_weights`, in the config's order.
    Called on the worker: a reward model in storage is copied to this node first."""
    from rayloop.storage import local_copy, training_state

    funcs = []
    for spec in specs:
        if spec.name == "exact_match":
            funcs.append(exact_match)
        elif spec.name == "format":
            funcs.append(integer_format)
        else:
            funcs.append(local_copy(spec.path, exclude=training_state))
    return funcs, [spec.weight for spec in specs]
