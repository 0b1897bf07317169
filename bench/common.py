"""Shared by the benchmarks: machine description and the results file."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(name: str, title: str, body: str) -> Path:
    """bench/results/<name>.md: a title, the machine, then the benchmark's own Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info().items())
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\n{machine}\n\n{body.rstrip()}\n")
    return path
