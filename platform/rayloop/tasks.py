"""A verifiable synthetic task: integer arithmetic with exactly checkable answers.

One seed gives the same splits every time: a pretraining corpus, an SFT set (prompt -> answer), preference pairs
(chosen = right answer, rejected = a plausible wrong one) and a held-out eval set whose problems never appear in
training. `score` is the exact-match check every job and reward uses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

from rayloop.config import TaskSection


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    width: int = 0
    """Digits of each operand, zero-padded (`07+45=`), and of the answer's magnitude, one more (`052`); 0: as
    written (`7+45=52`)."""

    @property
    def prompt(self) -> str:
        return f"{self.a:0{self.width}d}{self.op}{self.b:0{self.width}d}="

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def answer(self) -> str:
        return self.format(self.value)

    def format(self, value: int) -> str:
        """`value` written as this problem's answers are."""
        digits = f"{abs(value):0{self.width + 1 if self.width else 0}d}"
        return f"-{digits}" if value < 0 else digits

    @property
    def text(self) -> str:
        return self.prompt + self.answer


_INTEGER = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """The first integer in a completion, or None."""
    match = _INTEGER.search(completion)
    return match.group(0) if match else None


def score(completion: str, answer: str) -> float:
    """Exact match: 1.0 when the completion's first integer is the answer, and nothing but space follows it."""
    match = _INTEGER.match(completion.strip())
    if match is None:
        return 0.0
    rest = completion.strip()[match.end():]
    return float(match.group(0) == answer and rest.strip() == "")


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer, written as the right one is: the right one with one digit changed, or off by a small
    amount."""
    right = problem.answer
    digits = [i for i, c in enumerate(right) if c.isdigit()]
    while True:
        if rng.random() < 0.5:
            i = rng.choice(digits)
            candidate = right[:i] + str(rng.choice([d for d in range(10) if str(d) != right[i]])) + right[i + 1:]
            if not problem.width and len(candidate) > 1 and candidate.lstrip("-").startswith("0"):
                continue
            if problem.width and candidate.lstrip("-").strip("0") == "" and candidate.startswith("-"):
                continue  # "-000" is no way to write zero
        else:
            candidate = problem.format(problem.value + rng.choice([-10, -2, -1, 1, 2, 10]))
        if candidate != right:
            return candidate


class ArithmeticTask:
    """Problems `a op b` with operands of up to `max_digits` digits, split into train and held-out eval sets."""

    def __init__(self, cfg: TaskSection | None = None):
        self.cfg = cfg or TaskSection()

    @cached_property
    def _splits(self) -> tuple[list[Problem], list[Problem]]:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        high = 10**cfg.max_digits - 1
        space = (high + 1) ** 2 * len(cfg.ops)
        if cfg.num_train + cfg.num_eval > space:
            raise ValueError(f"task: {cfg.num_train + cfg.num_eval} problems asked, only {space} distinct exist")
        # Distinct problems: the eval set can then never leak into training.
        seen: set[Problem] = set()
        problems: list[Problem] = []
        while len(problems) < cfg.num_train + cfg.num_eval:
            problem = Problem(rng.randint(0, high), rng.choice(cfg.ops), rng.randint(0, high),
                              cfg.max_digits if cfg.fixed_width else 0)
            if problem not in seen:
                seen.add(problem)
                problems.append(problem)
        return problems[cfg.num_eval:], problems[: cfg.num_eval]

    @property
    def train_problems(self) -> list[Problem]:
        return self._splits[0]

    @property
    def eval_problems(self) -> list[Problem]:
        return self._splits[1]

    def pretrain_corpus(self) -> list[str]:
        """One document per training problem: `12+34=046` (`12+34=46` without `fixed_width`)."""
        return [p.text for p in self.train_problems]

    def sft_examples(self) -> list[dict]:
        """Prompt/completion pairs (TRL's prompt-completion format)."""
        return [{"prompt": p.prompt, "completion": p.answer} for p in self.train_problems]

    def preference_pairs(self, rejected_per_problem: int = 1) -> list[dict]:
        """Prompt/chosen/rejected triples (TRL's preference format): chosen right, rejected wrong; each training
        problem gives `rejected_per_problem` pairs with independently drawn wrong answers."""
        rng = random.Random(self.cfg.seed + 1)
        return [
            {"prompt": p.prompt, "chosen": p.answer, "rejected": wrong_answer(p, rng)}
            for p in self.train_problems for _ in range(rejected_per_problem)
        ]

    def train_examples(self) -> list[dict]:
        """Training prompts and their answers (TRL passes `answer` to reward functions)."""
        return [{"prompt": p.prompt, "answer": p.answer} for p in self.train_problems]

    def eval_preference_pairs(self) -> list[dict]:
        """Preference triples on the held-out problems."""
        rng = random.Random(self.cfg.seed + 2)
        return [{"prompt": p.prompt, "chosen": p.answer, "rejected": wrong_answer(p, rng)} for p in self.eval_problems]

    def eval_examples(self) -> list[dict]:
        """Held-out prompts and their answers."""
        return [{"prompt": p.prompt, "answer": p.answer} for p in self.eval_problems]


def accuracy(completions: list[str], answers: list[str]) -> float:
    """Mean exact-match score."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    return sum(score(c, a) for c, a in zip(completions, answers)) / max(len(answers), 1)
