"""A user's own reward for rayloop's GRPO job: 1.0 when the completion contains the row's `target` text.

TRL's reward signature: prompts and completions, plus every other column of the dataset (`target` here) and TRL's
own keywords, hence **kwargs. (A deliberately hackable reward: it teaches the model to put a 7 in every answer.)
"""


def contains_target(prompts, completions, target, **kwargs):
    return [float(t in completion) for completion, t in zip(completions, target)]
