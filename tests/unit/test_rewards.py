import asyncio
import inspect
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayloop.rewards import RewardError, checked, exact_match, http_reward, integer_format, run_error


def test_exact_match_scores_the_answer_only():
    assert exact_match(["46", " 46", "47", "46 and more", ""], answer=["46"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_reads_conversational_completions():
    assert exact_match([[{"role": "assistant", "content": "12"}]], answer=["12"]) == [1.0]


def test_format_rewards_a_bare_integer_right_or_wrong():
    assert integer_format(["46", "-3", "47", "4 6", "x", ""]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# Run-time checks: a reward that misbehaves mid-run stops the job with one line naming it.

CALL = {"prompts": ["a", "b"], "completions": ["x", "y"], "completion_ids": None, "trainer_state": None}


@pytest.mark.parametrize("returned, error", [
    ([1.0], r"reward 'mine' returned 1 rewards for 2 completions"),
    ([1.0, float("nan")], r"reward 'mine' returned nan for completion 1: expected a finite number or None"),
    ([float("inf"), 1.0], r"reward 'mine' returned inf for completion 0"),
    ([1.0, "high"], r"reward 'mine' returned 'high' for completion 1"),
    (0.5, r"reward 'mine' returned float, expected a list of 2 numbers"),
])
def test_a_reward_returning_the_wrong_thing_is_named(returned, error):
    with pytest.raises(RewardError, match=error):
        checked(lambda **_: returned, "mine")(**CALL)


def test_a_reward_that_raises_is_named_and_none_still_means_not_applicable():
    def broken(completions, **_):
        raise KeyError("score")

    with pytest.raises(RewardError, match=r"^reward 'mine' raised KeyError: 'score'$"):
        checked(broken, "mine")(**CALL)
    assert checked(lambda **_: [None, 2], "mine")(**CALL) == [None, 2]
    import numpy as np

    assert checked(lambda **_: np.array([0.5, 1.0], dtype=np.float32), "mine")(**CALL) == [0.5, 1.0]  # as TRL takes


def test_async_rewards_stay_async_and_are_checked():
    async def fine(completions, **_):
        return [1.0] * len(completions)

    async def short(completions, **_):
        return [1.0]

    assert inspect.iscoroutinefunction(checked(fine, "fine"))  # TRL gathers async rewards concurrently
    assert asyncio.run(checked(fine, "fine")(**CALL)) == [1.0, 1.0]
    with pytest.raises(RewardError, match="reward 'short' returned 1 rewards for 2 completions"):
        asyncio.run(checked(short, "short")(**CALL))


@pytest.fixture
def reward_server():
    """A JSON reward endpoint on loopback: rewards the length of each completion; `/fail` answers 500."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path == "/fail":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"model crashed")
                return
            answer = json.dumps({"rewards": [float(len(c)) for c in body["completions"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_http_reward_posts_the_batch_and_its_columns(reward_server):
    url, seen = reward_server
    reward = checked(http_reward(f"{url}/score", timeout_s=5), "judge")
    assert reward(prompts=["a", "b"], completions=["xyz", "y"], completion_ids=None, trainer_state=object(),
                  answer=["1", "2"]) == [3.0, 1.0]
    assert seen[-1] == {"prompts": ["a", "b"], "completions": ["xyz", "y"], "answer": ["1", "2"]}


def test_http_reward_failures_name_the_reward_and_the_url(reward_server):
    url, _ = reward_server
    with pytest.raises(RewardError, match=r"reward 'judge' raised RuntimeError: POST .*/fail: HTTP 500"):
        checked(http_reward(f"{url}/fail", timeout_s=5), "judge")(**CALL)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(RewardError, match=r"reward 'judge' raised RuntimeError: POST http://127.0.0.1:\d+/score: "
                                          r".*refused \(timeout 5 s\)"):
        checked(http_reward(f"http://127.0.0.1:{closed}/score", timeout_s=5), "judge")(**CALL)


def test_the_reward_error_is_found_inside_ray_trains_failure():
    failure = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File ...\n"
                           "rayloop.rewards.RewardError: reward 'mine' returned nan for completion 3\n")
    assert run_error(failure) == "reward 'mine' returned nan for completion 3"
    assert run_error(RuntimeError("out of memory")) is None
