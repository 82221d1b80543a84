"""The pipeline's report: one markdown page with each stage's curves, accuracy per stage and the final model's lineage.

Written to `<run folder>/report/` (local or in storage) beside the PNGs it shows, so it reads on any machine that can
see the runs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def _accuracy_png(points: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    names, values = zip(*points)
    bars = ax.bar(names, [100 * v for v in values], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in values])
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy after each stage")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ci(result: dict, percent: bool = True) -> str:
    fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3f}")
    return (f"{fmt(result['before'])} -> {fmt(result['after'])} (95% CI of the difference "
            f"[{fmt(result['ci_low'])}, {fmt(result['ci_high'])}], n={result['n']})")


def write_report(run_dir: str, stages: list[tuple[str, str, dict]], summary: dict, registry_uri: str) -> str:
    """`stages`: (name, run folder, summary) in order; `registry_uri`: where the stages registered. Returns the
    report's path."""
    from rayloop import registry, storage

    out = Path(tempfile.mkdtemp(prefix="rayloop-report-"))
    lines = ["# rayloop pipeline report", ""]
    # Accuracy per stage: the jobs' own paired held-out greedy figures (GRPO's from vLLM), then the endpoint's.
    points = []
    sft = next((s for name, _, s in stages if name == "sft"), None)
    if sft and sft.get("exact_match"):
        points += [("pretrain", sft["exact_match"]["before"]), ("sft", sft["exact_match"]["after"])]
    for name, _, stage in stages:
        if name not in ("pretrain", "sft") and stage.get("exact_match"):
            points.append((name, stage["exact_match"]["after"]))
    if "endpoint_accuracy" in summary:
        points.append(("endpoint", summary["endpoint_accuracy"]))
    if points:
        _accuracy_png(points, out / "accuracy.png")
        lines += ["## Accuracy", "", "![accuracy per stage](accuracy.png)", "",
                  "| after | held-out exact match |", "|---|---|"]
        lines += [f"| {name} | {100 * value:.1f}% |" for name, value in points]
        lines.append("")

    lines += ["## Stages", ""]
    for name, stage_dir, stage in stages:
        lines += [f"### {name}", "", f"- run: `{stage_dir}`", f"- model: `{stage['model_dir']}`"
                  + (f" (registered as `{stage['model_version']}`)" if stage.get("model_version") else "")]
        if "eval_loss" in stage and "eval_loss_before" in stage:
            lines.append(f"- eval loss {stage['eval_loss_before']:.3f} -> {stage['eval_loss']:.3f}")
        for key, label, percent in (("held_out_loss", "held-out loss", False), ("exact_match", "exact match", True),
                                    ("greedy_reward", "reward, greedy", False),
                                    ("sampled_reward", "reward, sampled", False)):
            if isinstance(stage.get(key), dict):
                lines.append(f"- {label}: {_ci(stage[key], percent)}")
        tensorboard = storage.join(stage_dir, "tensorboard")
        for png in ("loss.png", "reward.png"):
            source = storage.join(tensorboard, png)
            if storage.is_file(source):
                storage.copy(source, str(out / f"{name}-{png}"))
                lines += ["", f"![{name} {png[:-4]}]({name}-{png})"]
        lines.append("")

    if summary.get("model_version"):
        chain = registry.lineage(registry.client(registry_uri), summary["model_version"])
        lines += ["## Lineage", "", f"Registry: `{registry_uri}`", ""]
        lines += [f"{'  ' * i}- `{v.name}@{v.version}` {v.tags.get('job', '?')}: `{v.source}`"
                  for i, v in enumerate(chain)]
        lines += [f"{'  ' * len(chain)}- base: `{chain[-1].tags.get('parent', '-')}`", ""]
    if "endpoint_accuracy" in summary:
        lines += ["## Endpoint", "", f"- {summary['base_url']}, answered by "
                  f"{', '.join(summary['endpoint_versions'])}",
                  f"- exact match through the endpoint: {100 * summary['endpoint_accuracy']:.1f}%", ""]
    (out / "report.md").write_text("\n".join(lines))

    dest = storage.join(run_dir, "report")
    storage.upload(out, dest)
    shutil.rmtree(out, ignore_errors=True)
    return storage.join(dest, "report.md")
