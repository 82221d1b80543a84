import re

import pytest

from rayloop.config import TaskSection
from rayloop.tasks import ArithmeticTask, Problem, accuracy, extract_answer, score


def test_same_seed_same_data_other_seed_other_data():
    a, b = ArithmeticTask(TaskSection(seed=3)), ArithmeticTask(TaskSection(seed=3))
    assert a.pretrain_corpus() == b.pretrain_corpus()
    assert a.preference_pairs() == b.preference_pairs()
    assert ArithmeticTask(TaskSection(seed=4)).pretrain_corpus() != a.pretrain_corpus()


def test_splits_are_disjoint_and_sized():
    task = ArithmeticTask(TaskSection(num_train=500, num_eval=50))
    assert len(task.train_problems) == 500 and len(task.eval_problems) == 50
    assert not set(task.train_problems) & set(task.eval_problems)
    train_prompts = {e["prompt"] for e in task.sft_examples()}
    assert not train_prompts & {e["prompt"] for e in task.eval_examples()}


def test_answers_are_right():
    assert Problem(12, "+", 30).text == "12+30=42"
    assert Problem(5, "-", 17).text == "5-17=-12"
    for fixed_width in (True, False):
        for example in ArithmeticTask(TaskSection(num_train=200, fixed_width=fixed_width)).sft_examples():
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", example["prompt"]).groups()
            assert int(a) + (int(b) if op == "+" else -int(b)) == int(example["completion"])


def test_fixed_width_puts_every_digit_in_its_place():
    assert Problem(7, "+", 45, width=2).text == "07+45=052"
    assert Problem(5, "-", 17, width=2).text == "05-17=-012"
    assert Problem(99, "+", 99, width=2).text == "99+99=198"
    texts = ArithmeticTask(TaskSection(num_train=300)).pretrain_corpus()  # fixed width is the default
    assert {len(t.lstrip("-").replace("=-", "=")) for t in texts} == {9}


@pytest.mark.parametrize("fixed_width", [True, False])
def test_rejected_answers_are_wrong_and_well_formed(fixed_width):
    for pair in ArithmeticTask(TaskSection(num_train=300, fixed_width=fixed_width)).preference_pairs():
        assert pair["rejected"] != pair["chosen"]
        assert score(pair["rejected"], pair["chosen"]) == 0.0
        int(pair["rejected"])
        if fixed_width:  # written as the right answers are: a reward model cannot tell them apart by their width
            assert len(pair["rejected"].lstrip("-")) == len(pair["chosen"].lstrip("-")) == 3, pair


def test_several_rejected_answers_per_problem():
    task = ArithmeticTask(TaskSection(num_train=300))
    pairs = task.preference_pairs(rejected_per_problem=4)
    assert len(pairs) == 1200 and [p["prompt"] for p in pairs[:4]] == [task.train_problems[0].prompt] * 4
    per_prompt: dict[str, set[str]] = {}
    for pair in pairs:
        per_prompt.setdefault(pair["prompt"], set()).add(pair["rejected"])
    assert sum(len(wrong) > 1 for wrong in per_prompt.values()) > 250  # drawn independently, not copies


@pytest.mark.parametrize("completion, expected", [
    ("42", 1.0), (" 42 ", 1.0), ("42\n", 1.0), ("-12", 0.0), ("420", 0.0), ("4 2", 0.0), ("42+1", 0.0),
    ("", 0.0), ("forty-two", 0.0),
])
def test_score_is_exact_match(completion, expected):
    assert score(completion, "42") == expected


def test_score_negative_and_accuracy():
    assert score("-12", "-12") == 1.0
    assert extract_answer("x = -7 ok") == "-7"
    assert accuracy(["1", "2", "9"], ["1", "2", "3"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "2"])


def test_too_many_problems_for_the_space():
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask(TaskSection(max_digits=1, num_train=500, num_eval=10)).train_problems
