"""`adapt-deploy demo`: synthesize the benchmark, train source-only, WDA and oracle, compare."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from adapt_deploy.config import ExperimentConfig, load_config
from adapt_deploy.data.synthetic_writer import SynthSpec, write_benchmark
from adapt_deploy.engine.evaluate import EvalResult, format_iou_table
from adapt_deploy.engine.train import train
from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter, StageProgress

DEMO_METHODS = ("source_only", "wda_uda", "oracle")
METHOD_TITLES = {
    "source_only": "source only",
    "wda_uda": "adapted (WDA, pseudo-weak)",
    "oracle": "oracle (target labels)",
}


def packaged_config(relative: str) -> Path:
    """Path of a config shipped inside the package (configs/ at the repo root links there)."""
    return Path(str(resources.files("adapt_deploy") / "configs" / relative))


def demo_config(
    method: str, data_root: Path, overrides: list[str] | None = None
) -> ExperimentConfig:
    """The shipped synthetic config of `method`, pointed at the demo's data."""
    roots = {
        "source": data_root / "source",
        "target": data_root / "target",
        "val": data_root / "target",
    }
    root_overrides = [f"data.{name}.root={path}" for name, path in roots.items()]
    path = packaged_config(f"synthetic/{method}.yaml")
    return load_config(path, root_overrides + list(overrides or []))


@dataclass
class DemoResult:
    """Per-method evaluations on the target val split and where everything was written."""

    results: dict[str, EvalResult]
    out: Path
    seconds: dict[str, float]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows: IoU per class and mIoU for each method, in percent."""
        header = ["class"] + [METHOD_TITLES[m] for m in self.results]
        return header, format_iou_table(self.results)

    def markdown(self) -> str:
        """The table as Markdown, as the README shows it."""
        header, rows = self.table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"


def run_demo(
    out: Path,
    reporter: Reporter | None = None,
    fresh: bool = False,
    spec: SynthSpec | None = None,
    overrides: list[str] | None = None,
) -> DemoResult:
    """The end-to-end demo; finished runs in `out` with this config are reused unless `fresh`."""
    reporter = reporter or Reporter()
    out = Path(out)
    data = out / "data"
    spec = spec or SynthSpec()
    steps = len(DEMO_METHODS) + 1
    reporter.log(f"[1/{steps}] synthetic benchmark -> {data}")
    try:
        with StageProgress(reporter) as progress:
            write_benchmark(data, spec, progress=progress, force=fresh)
    except FileExistsError as exc:
        raise UserError(f"{exc} (run the demo with --fresh to regenerate it)") from None
    results: dict[str, EvalResult] = {}
    seconds: dict[str, float] = {}
    for step, method in enumerate(DEMO_METHODS, start=2):
        config = demo_config(method, data, overrides)
        run_dir = out / "runs" / method
        reporter.log(
            f"[{step}/{steps}] training {method} ({config.train.iterations} it.) -> {run_dir}"
        )
        cached = None if fresh else _completed_run(run_dir, config)
        if cached is not None:
            reporter.log("  reusing the completed run found there")
            results[method], seconds[method] = cached
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        result = train(config, run_dir, reporter=reporter)
        assert result.evaluation is not None
        results[method], seconds[method] = result.evaluation, result.seconds
        (run_dir / "seconds.json").write_text(json.dumps({"train_seconds": result.seconds}))
    demo = DemoResult(results, out, seconds)
    (out / "results.md").write_text(demo.markdown())
    return demo


def _completed_run(run_dir: Path, config: ExperimentConfig) -> tuple[EvalResult, float] | None:
    """The evaluation of a finished run with exactly this config, if there is one."""
    eval_file, config_file = run_dir / "eval.json", run_dir / "config.yaml"
    seconds_file = run_dir / "seconds.json"
    if not (eval_file.is_file() and config_file.is_file() and seconds_file.is_file()):
        return None
    if yaml.safe_load(config_file.read_text()) != config.to_dict():
        return None
    saved = json.loads(eval_file.read_text())
    if "confusion" not in saved or "protocol" not in saved:
        return None
    result = EvalResult(np.asarray(saved["confusion"]), list(saved["iou"]), saved["protocol"])
    return result, float(json.loads(seconds_file.read_text())["train_seconds"])
