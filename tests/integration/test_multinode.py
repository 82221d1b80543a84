"""Jobs and serving on a Ray cluster whose nodes share no disk, S3 as the only shared storage (multinode.py).

Everything is submitted as a user would, `ray job submit --working-dir .` from the checkout, with token auth on.
The job drivers run on the head; training workers, vLLM engines and Serve replicas on the two worker nodes, each
of which sees only its own /tmp, ~/.cache and ~/rayloop-runs. A run folder lives in the bucket and nowhere else.
The tests run in order and share the cluster: pretraining's checkpoint feeds SFT, SFT's GRPO (from a user's own
folder) and the endpoint. (The endpoint serves SFT's model: a few steps of that reward leave GRPO's answering
"7" to everything, which no adapter moves.)
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from multinode import Cluster, NetNamespace, S3Server, start_cluster, start_s3, wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY = "mn-key-" + os.urandom(8).hex()
TINY = ["--task.num_train=1000", "--task.num_eval=50"]
APP, PORT = "rayloop", 18000  # serve.deploy's default application name


@pytest.fixture(scope="module")
def cluster():
    net = NetNamespace()
    try:
        s3 = start_s3(net)
        try:
            cluster = start_cluster(s3)
            try:
                yield cluster, s3
            finally:
                cluster.stop()
        finally:
            s3.process.kill()
    finally:
        net.close()


def key_file(folder: Path) -> Path:
    """The endpoint's API key in a file on the head, which the deploying driver reads: a key in the job's runtime
    env would sit in the cluster's job table for anyone with the Ray token to read."""
    path = folder / "api_key"
    path.write_text(KEY)
    return path


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


PROBE = """
import ray, rayloop, serve
from rayloop.cluster import init_ray

init_ray()

@ray.remote(num_cpus=0)
def probe():
    import rayloop, serve
    return rayloop.EDIT_MARKER, serve.EDIT_MARKER

nodes = [f"node_name:worker{i}" for i in (1, 2)]
print("driver", rayloop.EDIT_MARKER, serve.EDIT_MARKER,
      *["worker " + " ".join(ray.get(probe.options(resources={n: 0.01}).remote())) for n in nodes])
"""


def test_a_submitted_job_runs_the_edited_checkout_on_every_node(cluster, tmp_path):
    import shutil
    import uuid

    cluster, _ = cluster
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info"))
    marker = uuid.uuid4().hex[:12]
    # Edits made after `pip install -e .` (which points at ROOT, not at this copy): only the upload can carry them,
    # and the worker nodes cannot see this copy at all.
    for package in ("platform/rayloop", "serve"):
        with open(checkout / package / "__init__.py", "a") as f:
            f.write(f"\nEDIT_MARKER = {marker!r}\n")
    (checkout / "jobs" / "edit_probe.py").write_text(PROBE)
    output = cluster.submit(checkout, "python", "-m", "jobs.edit_probe")
    assert f"driver {marker} {marker} worker {marker} {marker} worker {marker} {marker}" in output, output[-3000:]

    def without_token():
        try:
            return urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code

    assert cluster.net.run(without_token) == 401, "the job API answered a request without the token"


def test_pretrain_zero3_runs_on_two_nodes_with_s3_as_the_only_storage(cluster):
    """ZeRO-3, whose saved model is gathered from shards on two nodes; ZeRO-2 (pretrain_tiny.yaml's) runs on two
    nodes in the node-failure test below."""
    cluster, s3 = cluster
    names = cluster.node_ids()
    run = "pretrain-z3"
    output = cluster.rayloop(ROOT, "submit", "pretrain", "--config", "jobs/configs/pretrain_tiny.yaml",
                             "--deepspeed.zero_stage=3", "--train.steps=20", "--train.checkpoint_every=10",
                             "--scaling.placement_strategy=SPREAD", f"--storage.path={s3.uri('runs')}",
                             f"--storage.name={run}", *TINY).stdout
    assert "SUCCEEDED" in output and "pretrain: registered rayloop@" in output, output[-3000:]
    # The precision the workers (on other nodes) agreed on, said by the driver.
    assert "pretrain: training in " in output, output[-3000:]
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


NODE_PROBE = """
import ray

import my_rewards


def contains_target(prompts, completions, **kwargs):
    print(f"contains_target: {len(completions)} completions on node {ray.get_runtime_context().get_node_id()}",
          flush=True)
    return my_rewards.contains_target(prompts, completions, **kwargs)
"""


def test_sft_from_s3_then_grpo_from_a_users_own_folder_with_their_data_and_reward(cluster, tmp_path):
    """SFT starts from pretraining's checkpoint in the bucket; GRPO (vLLM rollouts) from SFT's, run from
    examples/own_reward as a user has it: a folder with their prompts, their reward module and a config, nothing
    of rayloop's, submitted with `--working-dir <that folder>`. The reward reads a dataset column, runs in both
    training workers (one a node), and moves the held-out figure it defines."""
    import shutil

    cluster, s3 = cluster
    cluster.rayloop(ROOT, "submit", "sft", "--config", "jobs/configs/sft_tiny.yaml",
                    f"--model.name_or_path={s3.uri('runs', 'pretrain-z3')}", "--train.steps=4",
                    "--train.checkpoint_every=2", "--train.eval_samples=8", "--task.num_train=500",
                    "--task.num_eval=20", f"--storage.path={s3.uri('runs')}")
    sft = results(s3, "sft-tiny")
    assert sft["model_dir"].startswith(f"s3://{s3.bucket}/runs/sft-tiny/checkpoint_"), sft

    folder = shutil.copytree(ROOT / "examples" / "own_reward", tmp_path / "my-project")
    # The user's reward, behind a probe that says which node each call ran on.
    (folder / "node_probe.py").write_text(NODE_PROBE)
    # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in words with digits (the node ids) into one line.
    # --verbose: the workers' output in the job's log, where the probe's lines are read.
    output = cluster.rayloop(folder, "submit", "grpo", "--env", "RAY_DEDUP_LOGS=0", "--verbose",
                             "--config", "grpo.yaml",
                             f"--model.name_or_path={s3.uri('runs', 'sft-tiny')}", f"--storage.path={s3.uri('runs')}",
                             "--train.steps=10", "--train.checkpoint_every=5", "--scaling.placement_strategy=SPREAD",
                             "--rewards=[{function: 'node_probe:contains_target'}]").stdout
    names = cluster.node_ids()
    reward_nodes = {names.get(line.split(" on node ")[1].split()[0]) for line in output.splitlines()
                    if "contains_target:" in line and " on node " in line}
    assert reward_nodes == {w.name for w in cluster.workers}, (reward_nodes, output[-3000:])
    result = results(s3, "own-reward")
    sampled = result["sampled_reward"]  # the share of sampled held-out completions that contain "7"
    print(f"own reward: called on {sorted(reward_nodes)}; held-out share of sampled completions containing '7' "
          f"{sampled['before']:.1%} -> {sampled['after']:.1%} (95% CI of the difference "
          f"[{sampled['ci_low']:+.1%}, {sampled['ci_high']:+.1%}], n={sampled['n']}); greedy "
          f"{result['greedy_reward']['before']:.1%} -> {result['greedy_reward']['after']:.1%}")
    assert result["step"] == 10 and sampled["n"] == 48 and "exact_match" not in result, result
    assert sampled["ci_low"] > 0 and sampled["after"] >= sampled["before"] + 0.15, sampled
    keys = s3.keys("runs/own-reward/")
    assert any(k.endswith("checkpoint/model.safetensors") for k in keys), keys
    assert any(k.startswith("runs/own-reward/tensorboard/events.out.tfevents") for k in keys), keys
    assert "runs/own-reward/tensorboard/reward.png" in keys, keys

    # Every job registered its model; the newest version's lineage goes back to the pretrained base.
    shown = cluster.rayloop(ROOT, "models", "show", "rayloop", "--json").stdout
    chain = json.loads(shown)
    print("lineage: " + " <- ".join(f"{v['name']}@{v['version']} ({v['tags']['job']})" for v in chain)
          + f" <- {chain[-1]['tags']['parent']}")
    assert [v["tags"]["job"] for v in chain] == ["grpo", "sft", "pretrain"], shown
    assert chain[0]["source"] == result["model_dir"] and chain[-1]["tags"]["parent"] == "preset:tiny", shown
    assert all(v["tags"]["ray_job_id"].startswith("raysubmit_") for v in chain), shown
    assert chain[-1]["source"].startswith(f"s3://{s3.bucket}/runs/pretrain-z3/"), shown
    text = cluster.rayloop(ROOT, "models", "show", "rayloop").stdout
    print(text)
    assert "lineage:" in text and "base: preset:tiny" in text


def test_dpo_and_reward_jobs_submitted_side_by_side_register_their_models(cluster):
    """The preference jobs, from SFT's checkpoint in the bucket, submitted together with `rayloop submit --no-wait`
    and followed with `rayloop logs -f`: each ends SUCCEEDED, its model registered with SFT's version as its parent
    (the reward model under a registered model of its own)."""
    cluster, s3 = cluster
    common = [f"--model.name_or_path={s3.uri('runs', 'sft-tiny')}", f"--storage.path={s3.uri('runs')}",
              "--train.steps=4", "--train.checkpoint_every=2", "--train.per_device_batch_size=8",
              "--task.num_train=200", "--task.num_eval=16"]
    submitted = {}
    for job, extra in (("dpo", ["--train.eval_samples=8"]), ("reward", ["--rejected_per_problem=1"])):
        output = cluster.rayloop(ROOT, "submit", job, "--no-wait", "--config", f"jobs/configs/{job}_tiny.yaml",
                                 *common, *extra).stdout
        submitted[job] = output.split("submitted ", 1)[1].split(":", 1)[0]
    for job, job_id in submitted.items():
        output = cluster.rayloop(ROOT, "logs", "-f", job_id, timeout_s=900).stdout
        model = {"dpo": "rayloop", "reward": "rayloop-reward"}[job]  # a reward model is no policy: a name of its own
        assert f"job {job_id}: SUCCEEDED" in output and f"{job}: registered {model}@" in output, output[-3000:]
        assert f"{job}: training in " in output, output[-3000:]
        ref = output.split(f"{job}: registered ", 1)[1].split()[0]
        chain = json.loads(cluster.rayloop(ROOT, "models", "show", ref, "--json").stdout)
        print(f"{job}: " + " <- ".join(f"{v['name']}@{v['version']} ({v['tags']['job']})" for v in chain))
        assert [v["tags"]["job"] for v in chain] == [job, "sft", "pretrain"], chain
        assert chain[0]["source"].startswith(f"s3://{s3.bucket}/runs/{job}-tiny/checkpoint_"), chain
        assert chain[0]["tags"]["ray_job_id"] == job_id, chain


def test_job_api_without_the_right_token_is_one_line_and_nothing_runs(cluster, tmp_path):
    cluster, _ = cluster
    for token_env in ({"RAY_AUTH_TOKEN": "wrong-" + "0" * 58}, {"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}):
        for args in (("status", "raysubmit_none"), ("submit", "pretrain", "--no-wait")):
            result = cluster.rayloop(ROOT, *args, env=token_env, check=False, timeout_s=60)
            lines = result.stderr.strip().splitlines()
            print(f"rayloop {' '.join(args)} with {sorted(token_env)}: exit {result.returncode}: {lines}")
            assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result
    listed = cluster.rayloop(ROOT, "status", "raysubmit_none", check=False)  # the right token: the API answers
    assert "raysubmit_none" in listed.stderr + listed.stdout


def test_a_worker_node_dies_mid_run_and_the_job_resumes_from_its_last_registered_checkpoint(cluster):
    cluster, s3 = cluster
    run = "pretrain-node-failure"
    snapshot_key = f"runs/{run}/checkpoint_manager_snapshot.json"
    outcome: dict = {}

    def submit():
        try:
            outcome["output"] = cluster.submit(
                ROOT, "python", "-m", "jobs.pretrain", "--config", "jobs/configs/pretrain_tiny.yaml",
                "--train.steps=80", "--train.checkpoint_every=20", "--train.keep_checkpoints=null",
                "--train.max_failures=1", "--scaling.placement_strategy=SPREAD", f"--storage.path={s3.uri('runs')}",
                f"--storage.name={run}", *TINY)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    job = threading.Thread(target=submit, daemon=True)
    job.start()

    def registered() -> list[str]:
        if snapshot_key not in s3.keys(f"runs/{run}/"):
            return []
        snapshot = json.loads(s3.read(snapshot_key))
        return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]

    before_kill = wait_for(registered, 400, "a first registered checkpoint")
    victim = cluster.workers[-1]
    killed = victim.kill()
    print(f"killed {victim.name} ({killed} processes) with {len(before_kill)} registered checkpoint(s)")
    job.join(timeout=900)
    assert not job.is_alive(), "the job did not finish after the node died"
    assert "error" not in outcome, outcome.get("error")
    result = results(s3, run)
    after = registered()
    checkpoint_metrics = [r["metrics"] for r in json.loads(s3.read(snapshot_key))["checkpoint_results"]]
    steps = {name: checkpoint_metrics[i]["step"] for i, name in enumerate(after)}
    assert result["step"] == 80, result
    assert result["resumed_from_step"] >= steps[before_kill[-1]] > 0, (result, steps)
    assert result["resumed_from_step"] in steps.values(), (result, steps)
    assert set(before_kill) <= set(after), "a checkpoint registered before the failure was lost"
    names = cluster.node_ids()
    # ZeRO-2 (pretrain_tiny.yaml's stage) on two nodes before the kill, on the node left after it.
    assert len(set(checkpoint_metrics[0]["worker_nodes"])) == 2, checkpoint_metrics[0]
    assert victim.name not in {names.get(n) for n in result["worker_nodes"]}, result["worker_nodes"]
    print(f"node failure: resumed from step {result['resumed_from_step']}, finished at step {result['step']} on "
          f"{[names.get(n) for n in result['worker_nodes']]}")
    cluster.workers.remove(victim)
    cluster.add_worker("worker3", 3)


def make_lora_adapter(out_dir: Path) -> None:
    """A PEFT LoRA adapter (random A and B, so it changes outputs) for the tiny preset's attention projections."""
    from peft import LoraConfig, get_peft_model

    from rayloop.models import build_model, train_tokenizer
    from rayloop.tasks import ArithmeticTask

    base = build_model("tiny", train_tokenizer(ArithmeticTask().pretrain_corpus()[:200]))
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out_dir)


def test_serve_deploy_loads_the_model_and_a_lora_adapter_from_s3_on_a_worker_node(cluster, tmp_path):
    from openai import OpenAI

    cluster, s3 = cluster
    make_lora_adapter(tmp_path / "shift")
    s3.put_folder(tmp_path / "shift", "loras/shift")
    # Two replicas, one a node: the node-failure test below kills one of them under load.
    models = (f"[{{id: policy, path: {s3.uri('runs', 'sft-tiny')}, lora_path: {s3.uri('loras')}, "
              f"max_lora_rank: 8, autoscaling: {{min_replicas: 2, max_replicas: 2}}}}]")
    output = cluster.submit(ROOT, "python", "-m", "serve.deploy", f"--models={models}", f"--port={PORT}",
                            "--ingress=openai", f"--auth.api_key_file={key_file(tmp_path)}")
    assert '"models": ["policy"]' in output, output[-2000:]
    prompts = ["12+34=", "07+08=", "55-21=", "03+99=", "40-07=", "61+19="]

    def ask():
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=2, timeout=120)
        models = [m.id for m in client.models.list().data]
        answers = {model: [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0)
                           .choices[0].text for p in prompts] for model in ("policy", "policy:shift")}
        return models, answers

    models, answers = cluster.net.run(ask)
    assert "policy" in models
    changed = sum(a != b for a, b in zip(answers["policy"], answers["policy:shift"]))
    assert changed > 0, f"the adapter changed no greedy answer: {answers}"
    names = cluster.node_ids()
    replicas = engine_replicas(cluster, APP)
    assert len(replicas) == 2 and all(names[r["node_id"]].startswith("worker") for r in replicas), replicas
    print(f"replica(s) on {[names[r['node_id']] for r in replicas]} ({[r['node_id'] for r in replicas]}); "
          f"the adapter changed {changed}/{len(prompts)} greedy answers")


def test_the_runs_wrote_nothing_but_caches_outside_the_bucket(cluster):
    import subprocess

    cluster, s3 = cluster
    for node in cluster.workers:
        def files(folder: str) -> list[str]:
            found = subprocess.run(["nsenter", "-t", str(node.process.pid), "-m", "find", folder, "-type", "f"],
                                   capture_output=True, text=True, timeout=60).stdout.split()
            return found

        runs = files(str(Path.home() / "rayloop-runs"))
        assert runs == [], f"{node.name} wrote run files to its own disk: {runs[:10]}"
        cache, tmp = files(str(Path.home() / ".cache")), files("/tmp")
        tops = sorted({"/".join(f.split("/")[:5]) for f in cache} | {"/".join(f.split("/")[:3]) for f in tmp})
        print(f"{node.name}: outside the bucket, {len(cache)} files under ~/.cache and {len(tmp)} under /tmp: {tops}")
        assert not [f for f in cache if f.startswith(str(Path.home() / ".cache" / "rayloop"))
                    and "/storage/" not in f], "rayloop's cache holds more than copies of storage"
    # The head (the drivers' machine) neither: the runs named only here are nowhere in its default storage.
    assert not [run for run in ("pretrain-z3", "pretrain-node-failure")
                if (Path.home() / "rayloop-runs" / run).exists()]


def test_killing_the_node_of_a_serve_replica_under_load_loses_under_1_percent(cluster):
    from openai import OpenAI

    cluster, s3 = cluster
    names = cluster.node_ids()
    replicas = engine_replicas(cluster, APP)  # deployed by the LoRA test above
    assert len(replicas) == 2, replicas
    ingress_nodes = {r["node_id"] for name, d in serve_applications(cluster)[APP]["deployments"].items()
                     if not name.startswith("LLMServer:") for r in d["replicas"]}
    candidates = [r["node_id"] for r in replicas if r["node_id"] not in ingress_nodes]
    # The ingress must outlive the kill: it is what re-sends the requests caught on the dead replica.
    assert candidates, f"an ingress replica on each engine replica's node: {ingress_nodes}"
    victim = next(w for w in cluster.workers if w.name == names[candidates[0]])

    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    slowest = [0.0]
    killed_at: list[float] = []
    stop = threading.Event()

    def load():
        # No retry by the client: a request caught on the dead replica must be re-sent by the endpoint itself.
        # What is measured is loss, not latency: while the lost replica's replacement, a vLLM engine, starts on
        # the survivor's two cores, a re-sent request can wait tens of seconds, so the timeout is generous and
        # the slowest request is printed, with each failure's start relative to the kill.
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=0, timeout=120)

        def one():
            while not stop.is_set():
                start = time.monotonic()
                try:
                    client.completions.create(model="policy", prompt="12+34=", max_tokens=8, temperature=0)
                    counts["ok"] += 1
                except Exception as exc:  # noqa: BLE001 - counted, and named in the failure message
                    counts["failed"] += 1
                    since_kill = f"{start - killed_at[0]:+.1f} s from the kill" if killed_at else "before the kill"
                    errors.append(f"{type(exc).__name__} {getattr(exc, 'status_code', '')}, started {since_kill}, "
                                  f"failed after {time.monotonic() - start:.1f} s: {str(exc)[:200]}")
                slowest[0] = max(slowest[0], time.monotonic() - start)

        workers = [threading.Thread(target=one, daemon=True) for _ in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()

    loader = threading.Thread(target=cluster.net.run, args=(load,), daemon=True)
    loader.start()
    wait_for(lambda: counts["ok"] >= 50, 120, "50 requests before the kill")
    killed_at.append(time.monotonic())
    killed = victim.kill()
    at_kill = dict(counts)
    wait_for(lambda: counts["ok"] + counts["failed"] - sum(at_kill.values()) >= 200, 300, "200 requests after it")
    stop.set()
    loader.join(timeout=150)  # longer than the client's timeout, so no request is still out when counted
    assert not loader.is_alive(), ("a request still out 150 s after the load stopped", counts, errors[-5:])
    total = counts["ok"] + counts["failed"]
    print(f"serve node failure: killed {victim.name} ({killed} processes); {counts['ok']}/{total} requests OK "
          f"({counts['ok'] / total:.2%}), {total - sum(at_kill.values())} after the kill, slowest {slowest[0]:.1f} s; "
          f"failures: {errors}")
    assert total >= 200 and counts["ok"] / total >= 0.99, (counts, errors)

    def replaced():
        alive = cluster.node_ids()
        running = [r for r in engine_replicas(cluster, APP) if r["state"] == "RUNNING"]
        return len(running) == 2 and all(alive.get(r["node_id"]) != victim.name for r in running)

    wait_for(replaced, 300, "the lost replica replaced", interval_s=5)
