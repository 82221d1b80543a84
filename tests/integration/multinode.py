"""A Ray cluster whose nodes share no disk, on one machine, and an S3-compatible server as its only shared storage.

- Network: everything runs in a network namespace of its own that holds only loopback (`unshare -n`), so every
  node's address is 127.0.0.1 (Ray would otherwise pick the machine's own interface address) and no packet can
  leave. Subprocesses enter it with `nsenter --net`; Python clients (boto3, openai) run in a thread that enters it
  (`NetNamespace.run`: network namespaces are per thread).
- S3: moto's server mode on loopback, one bucket. Every node and client gets the standard AWS variables for it,
  as cloud machines get an instance role and an endpoint.
- Head: `ray start --head` on 127.0.0.1 with Ray's token authentication, 0 CPUs (as cluster.yaml's head), the
  dashboard and job API on loopback. The job drivers run here, on the test's own disk.
- Worker nodes: `ray start --address=...`, each in its own mount namespace (`unshare -m`) with private tmpfs
  folders over /tmp, /dev/shm, ~/.cache and ~/rayloop-runs. A worker node sees neither the head's files nor the
  other worker's, as separate machines would; all of them share the network (loopback), so every node gets its
  own ports.
Killing a node kills every process in its mount namespace, the raylet included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RAYLOOP = str(BIN / "rayloop")
PRIVATE_DIRS = ["/tmp", "/dev/shm", str(Path.home() / ".cache"), str(Path.home() / "rayloop-runs")]
# The checkout with its .venv: the software every node has installed, kept visible on the worker nodes even where it
# lies under a private folder (a clone in /tmp).
SOFTWARE = str(Path(__file__).resolve().parents[2])


def private_mounts() -> str:
    """Shell commands, run in a new mount namespace, that give it its own empty PRIVATE_DIRS and keep SOFTWARE."""
    hidden = [d for d in PRIVATE_DIRS if SOFTWARE == d or SOFTWARE.startswith(d.rstrip("/") + "/")]
    keep = "/mnt/.rayloop-software"
    steps = [f"mkdir -p {keep} && mount --bind {SOFTWARE} {keep}"] if hidden else []
    steps += [f"mkdir -p {d} && mount -t tmpfs -o size=8g tmpfs {d}" for d in PRIVATE_DIRS]
    if hidden:
        steps.append(f"mkdir -p {SOFTWARE} && mount --bind {keep} {SOFTWARE}")
    return " && ".join(steps)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(interval_s)


class NetNamespace:
    """A network namespace with loopback only, kept alive by a sleeping process."""

    def __init__(self):
        self.anchor = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"],
                                       start_new_session=True)
        self.path = f"/proc/{self.anchor.pid}/ns/net"
        own = os.readlink("/proc/self/ns/net")
        wait_for(lambda: _readlink(self.path) not in (None, own), 10, "the network namespace", 0.1)
        time.sleep(0.5)  # `ip link set lo up` runs before the exec

    def command(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *args]

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in a thread inside the namespace (network namespaces are per thread)."""
        import ctypes

        outcome: dict = {}

        def target():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def close(self) -> None:
        """Kill every process in the namespace (whatever a test left running there), then the namespace."""
        own = _readlink(self.path)
        for pid in _pids_in("net", own):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.anchor.kill()


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _pids_in(kind: str, namespace: str | None) -> list[int]:
    """Every process whose `kind` namespace (`net`, `mnt`) is `namespace`."""
    if namespace is None:
        return []
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _readlink(f"{entry}/ns/{kind}") == namespace]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    net: "NetNamespace"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        def list_keys():
            import boto3

            client = boto3.client("s3", endpoint_url=self.endpoint, **_credentials())
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        return self.net.run(list_keys)

    def put_folder(self, local: Path, prefix: str) -> None:
        def put():
            import boto3

            client = boto3.client("s3", endpoint_url=self.endpoint, **_credentials())
            for file in Path(local).rglob("*"):
                if file.is_file():
                    client.upload_file(str(file), self.bucket, f"{prefix}/{file.relative_to(local)}")

        self.net.run(put)

    def read(self, key: str) -> bytes:
        def get():
            import boto3

            client = boto3.client("s3", endpoint_url=self.endpoint, **_credentials())
            return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return self.net.run(get)


def _credentials() -> dict:
    return dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")


def start_s3(net: NetNamespace, bucket: str = "rayloop") -> S3Server:
    port = free_port()
    process = subprocess.Popen(net.command(str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(endpoint, timeout=2).status < 500
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_for(lambda: net.run(up), 60, "moto S3 server")

    def create():
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=bucket)

    net.run(create)
    return S3Server(endpoint, bucket, process, net)


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    namespace: str | None = None
    """The inode of the node's mount namespace (`/proc/<pid>/ns/mnt`); None for the head, which is this machine."""

    def pids(self) -> list[int]:
        """Every process of this node: all processes in its mount namespace."""
        return _pids_in("mnt", self.namespace)

    def kill(self) -> int:
        """SIGKILL every process of the node at once, raylet included, as when its machine dies."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


@dataclass
class Cluster:
    address: str
    """The job API / dashboard: what `ray job submit --address` takes."""
    gcs: str
    env: dict[str, str]
    """What a client (and every node) has: the token, the storage credentials, the venv first on PATH."""
    head: Node
    net: NetNamespace
    workers: list[Node] = field(default_factory=list)
    temp_dir: str = ""

    def submit(self, cwd: str | Path, *entrypoint: str, timeout_s: float = 600) -> str:
        """`ray job submit --working-dir . -- entrypoint` from `cwd`; returns the job's output; fails the test if
        the job failed."""
        command = self.net.command(RAY, "job", "submit", f"--address={self.address}", "--working-dir", ".", "--",
                                   *entrypoint)
        result = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True,
                                timeout=timeout_s)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "succeeded" in output, f"{' '.join(entrypoint)}:\n{output[-4000:]}"
        return output

    def rayloop(self, cwd: str | Path, *args: str, env: dict | None = None, check: bool = True,
                timeout_s: float = 600) -> subprocess.CompletedProcess:
        """`rayloop <args>` from `cwd` against this cluster (its job API, its registry); fails the test on a
        non-zero exit when `check`."""
        command = self.net.command(RAYLOOP, *args)
        result = subprocess.run(command, cwd=cwd, env={**self.env, "RAY_API_SERVER_ADDRESS": self.address,
                                                       **(env or {})},
                                capture_output=True, text=True, timeout=timeout_s)
        if check:
            assert result.returncode == 0, f"rayloop {' '.join(args)}:\n{(result.stdout + result.stderr)[-4000:]}"
        return result

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> our node name, from `ray list nodes` (each node was started with a `node_name` label
        of its own through its resources)."""
        import json

        command = self.net.command(RAY, "list", "nodes", f"--address={self.address}", "--format=json", "--limit=100")
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        names = {}
        for node in json.loads(result.stdout):
            resources = node.get("resources_total", {})
            name = next((k.removeprefix("node_name:") for k in resources if k.startswith("node_name:")), "?")
            names[node["node_id"]] = name
        return names

    def alive_workers(self) -> int:
        import json

        command = self.net.command(RAY, "list", "nodes", f"--address={self.address}", "--format=json", "--limit=100")
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or not result.stdout.lstrip().startswith("["):
            return 0
        return sum(1 for n in json.loads(result.stdout) if n["state"] == "ALIVE" and not n.get("is_head_node"))

    def add_worker(self, name: str, cpus: int) -> Node:
        """A worker node in a mount namespace of its own (private tmpfs over PRIVATE_DIRS), joined to the head."""
        mounts = private_mounts()
        ports = 21000 + 1000 * len(self.workers)
        start = (f"exec {RAY} start --block --address={self.gcs} --node-ip-address=127.0.0.1 "
                 f"--num-cpus={cpus} --resources='{{\"node_name:{name}\": 1}}' "
                 f"--dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()} "
                 f"--min-worker-port={ports} --max-worker-port={ports + 999} --object-store-memory=200000000")
        before = self.alive_workers()
        process = subprocess.Popen(self.net.command("unshare", "-m", "--propagation", "private", "sh", "-c",
                                                    f"{mounts} && {start}"),
                                   env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        own = os.readlink("/proc/self/ns/mnt")
        wait_for(lambda: _readlink(f"/proc/{process.pid}/ns/mnt") not in (None, own), 10, f"{name}'s namespace", 0.1)
        node = Node(name, process, namespace=_readlink(f"/proc/{process.pid}/ns/mnt"))
        self.workers.append(node)
        wait_for(lambda: self.alive_workers() > before, 120, f"{name} joining the cluster", interval_s=2)
        return node

    def stop(self) -> None:
        for node in self.workers:
            node.kill()
        # `ray start --block` stops the head's daemons on SIGTERM, but with its worker nodes gone that outwaits any
        # bound (30 s measured): after 5 s the command is killed, and NetNamespace.close ends the daemons left.
        self.head.process.terminate()
        try:
            self.head.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.head.process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(s3: S3Server, *, workers: int = 2, cpus_per_worker: int = 3) -> Cluster:
    net = s3.net
    temp_dir = tempfile.mkdtemp(prefix="rl-mn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # The registry the jobs' drivers (on the head) write to and `rayloop models` reads: a head-local store.
    env = {**os.environ, **s3.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "MLFLOW_TRACKING_URI": f"sqlite:///{temp_dir}/mlflow.db",
           "PATH": f"{BIN}:{os.environ['PATH']}", "VLLM_LOGGING_LEVEL": "WARNING",
           # DeepSpeed's CPU comm op, built once with the installed software (as a node image would carry it),
           # not once per node and test run in each node's private ~/.cache (a minute of compiling on 2 cores).
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)  # Serve's Python proxy on the head: HAProxy would want fixed ports
    gcs_port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(net.command(
        RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}/head", f"--port={gcs_port}", "--num-cpus=0",
        "--resources={\"node_name:head\": 1}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--metrics-export-port={free_port()}", "--min-worker-port=20000", "--max-worker-port=20999",
        "--object-store-memory=200000000"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = Cluster(address=f"http://127.0.0.1:{dashboard_port}", gcs=f"127.0.0.1:{gcs_port}", env=env,
                      head=Node("head", head), net=net, temp_dir=temp_dir)

    def job_api_up():
        try:
            return urllib.request.urlopen(f"{cluster.address}/api/version", timeout=3).status == 200
        except urllib.error.HTTPError as err:
            return err.code in (401, 403)
        except OSError:
            return False

    try:
        wait_for(lambda: net.run(job_api_up), 120, "the head's job API")
        for i in range(workers):
            cluster.add_worker(f"worker{i + 1}", cpus_per_worker)
    except BaseException:
        cluster.stop()  # nothing of a half-started cluster outlives the test
        raise
    return cluster

