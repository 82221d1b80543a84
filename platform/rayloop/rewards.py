"""Rewards for online post-training (GRPO, RLOO), chosen and weighted in the config:

    rewards:
      - {function: rayloop.rewards:exact_match}             # built in: 1 when the completion is the `answer`
      - {function: my_rewards:brevity, weight: 0.2}          # the user's, from the job's working directory
      - {url: "http://judge.internal:8000/score", timeout_s: 10}  # any JSON endpoint the workers reach
      - {model: s3://bucket/runs/reward-tiny, weight: 0.5}   # a learned reward model (the reward job's output)

A function has TRL's reward signature: `f(prompts, completions, **kwargs) -> list[float | None]`, where kwargs
carry the dataset's other columns (e.g. `answer`) and TRL's own (`completion_ids`, `trainer_state`, ...); it may
be `async`. `None` means "does not apply to this completion", as in TRL. They become TRL's `reward_funcs` and
`reward_weights`: TRL sums the weighted rewards and logs each one (`rewards/<name>/mean`), and loads a reward
model from its folder itself.

What TRL does not do, and rayloop adds: the import, the signature and the URL are checked on the driver before Ray
starts (a URL as the driver sees it: on a cluster, use a host the workers reach too), and at run time a reward that
raises, returns something other than one finite number (or None) per completion stops the job with one line naming
it (`RewardError`), instead of a traceback from deep inside the trainer, or a NaN that TRL would read as "does not
apply".
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from typing import Any, Callable

from pydantic import Field, model_validator

from rayloop.config import Section

_INTEGER_ONLY = re.compile(r"\s*-?\d+\s*")
# What TRL passes a reward function besides prompts, completions and the dataset's columns (GRPOTrainer and
# RLOOTrainer `_calculate_rewards`).
TRL_REWARD_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardSpec(Section):
    function: str | None = None
    """`package.module:function` with TRL's reward signature, importable on every node (the job's working
    directory or an installed package). Built in: `rayloop.rewards:exact_match`, `rayloop.rewards:integer_format`."""
    url: str | None = None
    """An HTTP endpoint that takes `{"prompts": [...], "completions": [...], <columns>: [...]}` as a JSON POST and
    answers `{"rewards": [...]}` (one number or null per completion)."""
    model: str | None = None
    """A reward model folder (the reward job's model, checkpoint or run folder; local or `s3://`), scored by TRL."""
    weight: float = 1.0
    """Weight of this reward in the sum TRL optimises."""
    name: str | None = None
    """Label of a function or URL reward in logs and errors; unset: the function's name or the URL's host. (TRL
    names a `model` reward after its folder.)"""
    timeout_s: float = Field(default=30.0, gt=0)
    """For `url`: seconds to wait for an answer."""

    @model_validator(mode="after")
    def _one_source(self):
        sources = [field for field in ("function", "url", "model") if getattr(self, field) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of function, url or model (got {sources or 'none'})")
        if self.function is not None:
            import_function(self.function)
        elif self.url is not None:
            check_reachable(self.url)
        else:
            from rayloop.models import resolve_model_folder

            self.model = resolve_model_folder(self.model)
        if self.name is None:
            if self.function is not None:
                self.name = self.function.rsplit(":", 1)[-1]
            elif self.url is not None:
                from urllib.parse import urlsplit

                self.name = urlsplit(self.url).netloc
            else:
                self.name = "reward_model"
        return self


class RewardError(RuntimeError):
    """A reward that failed at run time; the message names it."""


def import_function(spec: str) -> Callable:
    """The callable at `package.module:function`; a ValueError that says what is wrong otherwise."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"function {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module: one line
        raise ValueError(f"function {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc} (the module "
                         f"must be in the job's working directory or an installed package)") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"function {spec!r}: {module_name!r} has no function {attribute!r}")
    return function


def check_signature(spec: RewardSpec, columns: list[str]) -> None:
    """The function can take what TRL will pass it: prompts, completions, TRL's keywords and these columns."""
    if spec.function is None:
        return
    function = import_function(spec.function)
    passed = {"prompts": [], "completions": [], **{k: None for k in TRL_REWARD_KWARGS},
              **{c: [] for c in columns if c not in ("prompt", "completion")}}
    try:
        inspect.signature(function).bind(**passed)
    except TypeError as exc:
        raise ValueError(f"function {spec.function!r} cannot take TRL's reward arguments ({exc}): it is called as "
                         f"f(prompts=..., completions=..., {', '.join(sorted(set(passed) - {'prompts', 'completions'}))}"
                         f"); add **kwargs") from None


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the URL's host and port opens (a running endpoint; its answers are checked at run time)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {url!r}: expected http://host[:port]/path")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"url {url!r}: cannot reach {parts.hostname}:{port}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Built-in rewards (for datasets with an `answer` column, such as the arithmetic task's)
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# On the worker
# ---------------------------------------------------------------------------------------------------------------


def _checked_output(name: str, rewards: Any, expected: int) -> list:
    import numbers

    if isinstance(rewards, str | bytes | dict) or not hasattr(rewards, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(rewards).__name__}, expected a list of {expected} numbers")
    rewards = list(rewards)  # a list, a tuple or a numpy array, as TRL takes them
    if len(rewards) != expected:
        raise RewardError(f"reward {name!r} returned {len(rewards)} rewards for {expected} completions")
    for i, value in enumerate(rewards):
        if value is None:
            continue  # TRL's "does not apply"
        # numbers.Real covers bools and numpy scalars, as TRL's torch.tensor(...) does.
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {name!r} returned {value!r} for completion {i}: expected a finite number or "
                              f"None")
    return rewards


def checked(function: Callable, name: str) -> Callable:
    """`function` behind the run-time checks, under `name` (TRL logs a reward by its callable's name)."""
    from trl.trainer.utils import is_async_callable

    if is_async_callable(function):  # TRL's own test: it decides how TRL calls the wrapper
        @functools.wraps(function)
        async def guarded_async(*args, **kwargs):
            try:
                rewards = await function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised with the reward's name
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
            return _checked_output(name, rewards, len(kwargs["completions"]))

        guarded = guarded_async
    else:
        @functools.wraps(function)
        def guarded(*args, **kwargs):
            try:
                rewards = function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised with the reward's name
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
            return _checked_output(name, rewards, len(kwargs["completions"]))

    guarded.__name__ = name
    return guarded


def http_reward(url: str, timeout_s: float) -> Callable:
    """A reward function that POSTs the batch to `url` (JSON) and reads `{"rewards": [...]}`."""
    def reward(prompts, completions, **kwargs):
        import json
        import urllib.error
        import urllib.request

        columns = {k: v for k, v in kwargs.items() if k not in TRL_REWARD_KWARGS and _is_json(v)}
        body = json.dumps({"prompts": prompts, "completions": completions, **columns}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {url}: HTTP {exc.code}: {exc.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RuntimeError(f"POST {url}: {getattr(exc, 'reason', exc)} (timeout {timeout_s} s)") from None
        except ValueError:
            raise RuntimeError(f"POST {url}: the answer is not JSON") from None
        return answer.get("rewards") if isinstance(answer, dict) else answer

    return reward


def _is_json(value) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def reward_funcs(specs: list[RewardSpec]) -> tuple[list, list[float]]:
    """TRL's `reward_funcs` (checked functions, or model folders TRL loads) and `reward_weights`, in the config's
    order. Called on the worker: a reward model in storage is copied to this node first."""
    from rayloop.storage import local_copy, training_state

    funcs: list = []
    for spec in specs:
        if spec.function is not None:
            funcs.append(checked(import_function(spec.function), spec.name))
        elif spec.url is not None:
            funcs.append(checked(http_reward(spec.url, spec.timeout_s), spec.name))
        else:
            funcs.append(local_copy(spec.model, exclude=training_state))
    return funcs, [spec.weight for spec in specs]


def run_error(exc: BaseException) -> str | None:
    """The one-line message of a `RewardError` or `DatasetError` inside a failed run (Ray wraps the worker's
    error in its own), if any."""
    for line in str(exc).splitlines():
        for kind in ("RewardError: ", "DatasetError: "):
            if kind in line:
                return line.split(kind, 1)[1].strip()
    return None
