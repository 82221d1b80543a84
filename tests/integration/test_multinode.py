"""Jobs and serving on a Ray cluster whose nodes share no disk, S3 as the only shared storage (multinode.py).

Everything is submitted as a user would, `ray job submit --working-dir .` from the checkout, with token auth on.
The job drivers run on the head; training workers, vLLM engines and Serve replicas on the two worker nodes, each
of which sees only its own /tmp, ~/.cache and ~/rayloop-runs. A run folder lives in the bucket and nowhere else.
The tests run in order and share the cluster: pretraining's checkpoint feeds SFT, SFT's GRPO, GRPO's the endpoint.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from multinode import Cluster, NetNamespace, S3Server, start_cluster, start_s3, wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY = "mn-key-" + os.urandom(8).hex()
TINY = ["--task.num_train=1000", "--task.num_eval=50"]


@pytest.fixture(scope="module")
def cluster():
    net = NetNamespace()
    s3 = start_s3(net)
    cluster = start_cluster(s3)
    yield cluster, s3
    cluster.stop()
    s3.process.kill()
    net.close()


def results(s3: S3Server, run: str) -> dict:
    return json.loads(s3.read(f"runs/{run}/results.json"))


def serve_applications(cluster: Cluster) -> dict:
    """Serve's own view of the applications (the dashboard's REST API), replicas with their node ids."""
    def get():
        request = urllib.request.Request(f"{cluster.address}/api/serve/applications/",
                                         headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
        return json.loads(urllib.request.urlopen(request, timeout=30).read())

    return cluster.net.run(get)["applications"]


def engine_replicas(cluster: Cluster, app: str) -> list[dict]:
    deployments = serve_applications(cluster)[app]["deployments"]
    return [r for name, d in deployments.items() if name.startswith("LLMServer:") for r in d["replicas"]]


def test_pretrain_zero2_and_zero3_run_on_two_nodes_with_s3_as_the_only_storage(cluster):
    cluster, s3 = cluster
    names = cluster.node_ids()
    for stage in (2, 3):
        run = f"pretrain-z{stage}"
        output = cluster.submit(ROOT, "python", "-m", "jobs.pretrain", "--config", "jobs/configs/pretrain_tiny.yaml",
                                f"--deepspeed.zero_stage={stage}", "--train.steps=20", "--train.checkpoint_every=10",
                                "--scaling.placement_strategy=SPREAD", f"--storage.path={s3.uri('runs')}",
                                f"--storage.name={run}", *TINY)
        result = results(s3, run)
        assert sorted(names[node] for node in result["worker_nodes"]) == ["worker1", "worker2"], result
        assert result["step"] == 20 and result["eval_loss"] < result["eval_loss_before"], result
        assert result["model_dir"].startswith(f"s3://{s3.bucket}/runs/{run}/checkpoint_"), result
        assert f"model at {result['model_dir']}" in output
        keys = s3.keys(f"runs/{run}/")
        checkpoints = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_2")})
        assert len(checkpoints) == 2, keys
        for checkpoint in checkpoints:
            assert f"runs/{run}/{checkpoint}/hf/model.safetensors" in keys
        assert f"runs/{run}/base_model/config.json" in keys  # the preset, built by the driver, read by the workers
        assert f"runs/{run}/{checkpoints[-1]}/loss.png" in keys
        assert any(k.startswith(f"runs/{run}/tensorboard/events.out.tfevents") for k in keys), keys
        print(f"{run}: workers on {[names[n] for n in result['worker_nodes']]} ({result['worker_nodes']})")


def test_sft_then_grpo_with_vllm_rollouts_start_from_the_checkpoint_in_s3(cluster):
    cluster, s3 = cluster
    common = ["--train.steps=4", "--train.checkpoint_every=2", "--train.eval_samples=8", "--task.num_train=500",
              "--task.num_eval=20", f"--storage.path={s3.uri('runs')}"]
    cluster.submit(ROOT, "python", "-m", "jobs.sft", "--config", "jobs/configs/sft_tiny.yaml",
                   f"--model.name_or_path={s3.uri('runs', 'pretrain-z2')}", *common)
    sft = results(s3, "sft-tiny")
    assert sft["model_dir"].startswith(f"s3://{s3.bucket}/runs/sft-tiny/checkpoint_"), sft
    cluster.submit(ROOT, "python", "-m", "jobs.grpo", "--config", "jobs/configs/grpo_tiny.yaml",
                   f"--model.name_or_path={s3.uri('runs', 'sft-tiny')}", "--train.per_device_batch_size=8",
                   "--rollout.engine=vllm", *common)
    grpo = results(s3, "grpo-tiny")
    assert grpo["step"] == 4 and "sampled_exact_match" in grpo, grpo
    keys = s3.keys("runs/grpo-tiny/")
    assert any(k.endswith("checkpoint/model.safetensors") for k in keys), keys
    assert any("/time/vLLM.generate" in k or k.startswith("runs/grpo-tiny/tensorboard/") for k in keys), keys


def test_serve_deploy_loads_the_model_from_s3_on_a_worker_node(cluster):
    from openai import OpenAI

    cluster, s3 = cluster
    port = 18000
    runtime_env = json.dumps({"env_vars": {"RAYLOOP_API_KEY": KEY}})
    output = cluster.submit(ROOT, "python", "-m", "serve.deploy", f"--model={s3.uri('runs', 'grpo-tiny')}",
                            "--model_id=policy", f"--port={port}", "--ingress=openai",
                            options=("--runtime-env-json", runtime_env))
    assert '"models": ["policy"]' in output, output[-2000:]

    def ask():
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=2, timeout=60)
        models = [m.id for m in client.models.list().data]
        completion = client.completions.create(model="policy", prompt="12+34=", max_tokens=4, temperature=0)
        return models, completion

    models, completion = cluster.net.run(ask)
    assert models == ["policy"] and completion.choices[0].text is not None
    names = cluster.node_ids()
    replicas = engine_replicas(cluster, "rayloop")
    assert replicas and all(names[r["node_id"]].startswith("worker") for r in replicas), replicas
    print(f"replica(s) on {[names[r['node_id']] for r in replicas]} ({[r['node_id'] for r in replicas]})")
