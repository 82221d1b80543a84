from rayloop.rewards import exact_match, integer_format


def test_exact_match_scores_the_answer_only():
    assert exact_match(["46", " 46", "47", "46 and more", ""], answer=["46"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_reads_conversational_completions():
    assert exact_match([[{"role": "assistant", "content": "12"}]], answer=["12"]) == [1.0]


def test_format_rewards_a_bare_integer_right_or_wrong():
    assert integer_format(["46", "-3", "47", "4 6", "x", ""]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
