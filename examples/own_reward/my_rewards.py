"""A user's own reward for rayloop's GRPO job: 1.0 when the completion contains the row's `target` text.

TRL's reward signature: prompts and completions, plus every other column of the dataset (`target` here) and TRL's
own keywords, hence **kwargs. A completion is a string, or for conversational prompts a list of messages.
(A deliberately hackable reward: it teaches the model to put a 7 in every answer.)
"""


def contains_target(prompts, completions, target, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t in text) for text, t in zip(texts, target)]
