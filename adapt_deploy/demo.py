"""`adapt-deploy demo`: synthesize the benchmark, pretrain on the source, then train source-only,
WDA and oracle from that model with the same budget, and compare them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from adapt_deploy.config import ConfigError, ExperimentConfig, from_dict, load_config
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.engine.evaluate import EvalResult, format_iou_table
from adapt_deploy.engine.train import train
from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter, StageProgress
from adapt_deploy.stream import StreamSummary
from adapt_deploy.stream.demo import stream_demo_video

DEMO_METHODS = ("source_only", "wda_uda", "oracle")
METHOD_TITLES = {
    "source_only": "source only",
    "wda_uda": "adapted (WDA, pseudo-weak)",
    "oracle": "oracle (target labels)",
}


# The adaptation stage: a method starts from a source-only model (what ImageNet-pretrained
# DeepLab weights are to the paper: features that already segment) and trains this long.
ADAPT_STAGE: tuple[str, ...] = (
    "train.iterations=1200",
    "optim.schedule_iters=1200",
    "optim.lr=0.0025",
)


def packaged_config(relative: str) -> Path:
    """Path of a config shipped inside the package (configs/ at the repo root links there)."""
    return Path(str(resources.files("adapt_deploy") / "configs" / relative))


def demo_config(
    method: str, data_root: Path, overrides: list[str] | None = None
) -> ExperimentConfig:
    """The shipped synthetic config of `method`, pointed at the demo's data (a multi-source
    config's data.sources too: data/synthetic/NAME becomes DATA_ROOT/NAME)."""
    roots = {
        "source": data_root / "source",
        "target": data_root / "target",
        "val": data_root / "target",
    }
    root_overrides = [f"data.{name}.root={path}" for name, path in roots.items()]
    path = packaged_config(f"synthetic/{method}.yaml")
    sources = (yaml.safe_load(path.read_text()).get("data") or {}).get("sources") or []
    if sources:
        moved = [{**e, "root": str(data_root / Path(e["root"]).name)} for e in sources]
        root_overrides.append(f"data.sources={json.dumps(moved)}")
    return load_config(path, root_overrides + list(overrides or []))


@dataclass
class DemoResult:
    """Per-method evaluations on the target val split and where everything was written."""

    results: dict[str, EvalResult]
    out: Path
    seconds: dict[str, float]
    stream: StreamSummary | None = None  # the dashcam video through the exported WDA model

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
    steps = len(DEMO_METHODS) + 3
    reporter.log(f"[1/{steps}] synthetic benchmark -> {data}")
    try:
        with StageProgress(reporter) as progress:
            write_benchmark(data, spec, progress=progress, force=fresh)
    except FileExistsError as exc:
        raise UserError(f"{exc} (run the demo with --fresh to regenerate it)") from None
    pretrain_dir = out / "runs" / "pretrain"
    config = demo_config("source_only", data, overrides)
    reporter.log(
        f"[2/{steps}] source-only pretraining ({config.train.iterations} it.) -> {pretrain_dir}"
    )
    _, _, retrained = _train_or_reuse(pretrain_dir, config, reporter, fresh)
    stage = [f"model.init={pretrain_dir / 'checkpoint.pt'}", *ADAPT_STAGE, *(overrides or [])]
    results: dict[str, EvalResult] = {}
    seconds: dict[str, float] = {}
    for step, method in enumerate(DEMO_METHODS, start=3):
        config = demo_config(method, data, stage)
        run_dir = out / "runs" / method
        reporter.log(
            f"[{step}/{steps}] {method} from the pretrained model "
            f"({config.train.iterations} it.) -> {run_dir}"
        )
        results[method], seconds[method], _ = _train_or_reuse(
            run_dir, config, reporter, fresh or retrained
        )
    demo = DemoResult(results, out, seconds)
    (out / "results.md").write_text(demo.markdown())
    videos = sorted((data / "videos").glob("*.mp4"))
    if videos:
        reporter.log(
            f"[{steps}/{steps}] exporting wda_uda to {out / 'bundle'} and streaming "
            f"{videos[0].name} through it -> {out / 'stream' / 'overlay.mp4'}"
        )
        checkpoint = out / "runs" / "wda_uda" / "checkpoint.pt"
        demo.stream = stream_demo_video(checkpoint, videos[0], out, reporter)
    return demo


def _train_or_reuse(
    run_dir: Path, config: ExperimentConfig, reporter: Reporter, fresh: bool
) -> tuple[EvalResult, float, bool]:
    """Evaluation and training seconds of `config` in `run_dir`, and whether it was trained now
    (a finished run with exactly this config is reused unless `fresh`)."""
    cached = None if fresh else completed_run(run_dir, config)
    if cached is not None:
        reporter.log("  reusing the completed run found there")
        return cached[0], cached[1], False
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result = train(config, run_dir, reporter=reporter)
    assert result.evaluation is not None
    (run_dir / "seconds.json").write_text(json.dumps({"train_seconds": result.seconds}))
    return result.evaluation, result.seconds, True


def completed_run(run_dir: Path, config: ExperimentConfig) -> tuple[EvalResult, float] | None:
    """The evaluation of a finished run with exactly this config, if there is one.

    The saved config is read through `from_dict`, so keys added to the config since the run
    was made count as their defaults (what the run did), as `train --resume` reads it.
    """
    eval_file, config_file = run_dir / "eval.json", run_dir / "config.yaml"
    seconds_file = run_dir / "seconds.json"
    if not (eval_file.is_file() and config_file.is_file() and seconds_file.is_file()):
        return None
    try:
        saved_config = from_dict(yaml.safe_load(config_file.read_text()), source=str(config_file))
    except (ConfigError, yaml.YAMLError):
        return None
    if saved_config.to_dict() != config.to_dict():
        return None
    saved = json.loads(eval_file.read_text())
    if "confusion" not in saved or "protocol" not in saved:
        return None
    result = EvalResult(np.asarray(saved["confusion"]), list(saved["iou"]), saved["protocol"])
    return result, float(json.loads(seconds_file.read_text())["train_seconds"])
