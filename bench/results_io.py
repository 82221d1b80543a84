"""What every bench writes beside its figures: the machine, the command and the commit, as JSON and a Markdown
table in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "an unnamed CPU"


def machine() -> str:
    """`2 CPUs of AMD EPYC ...; CPU with AVX512-BF16`: the cores, the model, and what precision `auto` sees (the
    detection alone: RAYLOOP_CPU_BF16 set for a run does not change this line)."""
    from rayloop.precision import cpu_bf16

    told = os.environ.pop("RAYLOOP_CPU_BF16", None)
    try:
        bf16 = cpu_bf16()[1]
    finally:
        if told is not None:
            os.environ["RAYLOOP_CPU_BF16"] = told
    return f"{os.cpu_count()} CPUs of {cpu_model()}; {bf16}"


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+uncommitted changes" if dirty else "")


def write_results(name: str, record: dict, table: list[str], *, command: str,
                  code: str | None = None) -> tuple[Path, Path]:
    """bench/results/<name>.json (the record plus machine, command, commit) and <name>.md (a heading, those three,
    and `table`). `code`: the commit the runs ran (`commit()` when the bench started), default the current one.
    Each run replaces the last: git log keeps the earlier ones."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": record.get("machine") or machine(), "command": command, "commit": code or commit()}
    record = {**meta, **record}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path.write_text("\n".join([f"# {name}", "", f"- machine: {meta['machine']}", f"- command: `{command}`",
                                  f"- commit: {meta['commit']}", "", *table]) + "\n")
    print(f"figures in {json_path} and {md_path}")
    return json_path, md_path
