"""`adapt-deploy demo`: synthesize the benchmark, pretrain on the source, then train source-only,
the adapted model and the oracle from that model with the same budget, compare them, and time
every stage."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from adapt_deploy.atomic import atomic_write_json
from adapt_deploy.config import ConfigError, ExperimentConfig, from_dict, load_config
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.data.weak import points_path, stats_path, write_class_stats, write_points
from adapt_deploy.demo_reference import compare_with_reference, load_reference
from adapt_deploy.engine.evaluate import EvalResult, format_iou_table
from adapt_deploy.engine.train import train
from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter, StageProgress
from adapt_deploy.stream import StreamSummary
from adapt_deploy.stream.demo import stream_demo_video

# The adapted model: the strongest adaptation of the methods table (bench/adaptation.py), the
# teacher-student self-training with WDA's image-level and point labels of the target.
ADAPTED = "selftrain_point"
DEMO_METHODS = ("source_only", ADAPTED, "oracle")
METHOD_TITLES = {
    "source_only": "source only",
    ADAPTED: "adapted (self-training, one point per class)",
    "oracle": "oracle (target labels)",
}


# The adaptation stage: a method starts from a source-only model (what ImageNet-pretrained
# DeepLab weights are to the paper: features that already segment) and trains this long.
ADAPT_STAGE: tuple[str, ...] = (
    "train.iterations=1200",
    "optim.schedule_iters=1200",
    "optim.lr=0.0025",
)


def seed_overrides(seed: int) -> list[str]:
    """What a seed changes in every stage: the training seed and the draw of the target's
    points (bench/adaptation.py's seeds are the same)."""
    return [f"train.seed={seed}", f"adapt.point_seed={seed}"]


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
    """Per-method evaluations on the target val split, the stage times and where everything was
    written."""

    results: dict[str, EvalResult]
    out: Path
    seconds: dict[str, float]  # training seconds of each method
    stream: StreamSummary | None = None  # the dashcam video through the exported adapted model
    seed: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds of each stage, in order
    reused: set[str] = field(default_factory=set)  # stages whose finished output was reused

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

    def miou(self) -> dict[str, float]:
        """mIoU in percent of each method, rounded as the tables print it."""
        return {m: round(100 * r.miou, 1) for m, r in self.results.items()}

    def stage_line(self) -> str:
        """One line of stage times: "synthesis 12 s, pretraining 98 s, ...; total 353 s"."""
        parts = [
            f"{name} {seconds:.0f} s" + (" (reused)" if name in self.reused else "")
            for name, seconds in self.stages.items()
        ]
        return ", ".join(parts) + f"; total {sum(self.stages.values()):.0f} s"

    def against_reference(self) -> list[str]:
        """This run's mIoU against the README's ranges (`demo_reference.json`), with a verdict
        per model; no lines when the reference is missing."""
        reference = load_reference()
        return [] if reference is None else compare_with_reference(self.miou(), reference)

    def record(self) -> dict:
        """What `demo.json` keeps: seed, mIoU and IoU per class of each method, stage times."""
        return {
            "seed": self.seed,
            "miou": self.miou(),
            "iou": {m: r.to_dict()["iou"] for m, r in self.results.items()},
            "stages": self.stages,
            "reused": sorted(self.reused),
        }


class _StageClock:
    """Wall time of each stage of the demo, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reused: set[str] = set()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start


def run_demo(
    out: Path,
    reporter: Reporter | None = None,
    fresh: bool = False,
    spec: SynthSpec | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
) -> DemoResult:
    """The end-to-end demo; finished runs in `out` with this config are reused unless `fresh`.

    Writes OUT/results.md (the IoU table) and OUT/demo.json (`DemoResult.record`)."""
    reporter = reporter or Reporter()
    out = Path(out)
    data = out / "data"
    spec = spec or SynthSpec()
    clock = _StageClock()
    seeded = seed_overrides(seed) + list(overrides or [])
    steps = len(DEMO_METHODS) + 4
    reporter.log(f"[1/{steps}] synthetic benchmark -> {data}")
    with clock.stage("synthesis"):
        try:
            with StageProgress(reporter) as progress:
                write_benchmark(data, spec, progress=progress, force=fresh)
        except FileExistsError as exc:
            raise UserError(f"{exc} (run the demo with --fresh to regenerate it)") from None
    pretrain_dir = out / "runs" / "pretrain"
    config = demo_config("source_only", data, seeded)
    reporter.log(
        f"[2/{steps}] source-only pretraining ({config.train.iterations} it., seed {seed}) "
        f"-> {pretrain_dir}"
    )
    with clock.stage("pretraining"):
        _, _, retrained = _train_or_reuse(pretrain_dir, config, reporter, fresh)
    if not retrained:
        clock.reused.add("pretraining")
    reporter.log(f"[3/{steps}] the target's image-level labels and points (seed {seed})")
    with clock.stage("weak labels"):
        _write_weak_labels(data / "target", seed, reporter)
    stage = [f"model.init={pretrain_dir / 'checkpoint.pt'}", *ADAPT_STAGE, *seeded]
    results: dict[str, EvalResult] = {}
    seconds: dict[str, float] = {}
    for step, method in enumerate(DEMO_METHODS, start=4):
        config = demo_config(method, data, stage)
        run_dir = out / "runs" / method
        reporter.log(
            f"[{step}/{steps}] {method} from the pretrained model "
            f"({config.train.iterations} it.) -> {run_dir}"
        )
        with clock.stage(method):
            results[method], seconds[method], trained = _train_or_reuse(
                run_dir, config, reporter, fresh or retrained
            )
        if not trained:
            clock.reused.add(method)
    demo = DemoResult(results, out, seconds, seed=seed)
    (out / "results.md").write_text(demo.markdown())
    videos = sorted((data / "videos").glob("*.mp4"))
    if videos:
        reporter.log(
            f"[{steps}/{steps}] exporting {ADAPTED} to {out / 'bundle'} and streaming "
            f"{videos[0].name} through it -> {out / 'stream' / 'overlay.mp4'}"
        )
        checkpoint = out / "runs" / ADAPTED / "checkpoint.pt"
        with clock.stage("export and stream"):
            demo.stream, reused = stream_demo_video(checkpoint, videos[0], out, reporter, fresh)
        if reused:
            clock.reused.add("export and stream")
    demo.stages, demo.reused = clock.seconds, clock.reused
    atomic_write_json(out / "demo.json", demo.record())
    return demo


def _write_weak_labels(target: Path, seed: int, reporter: Reporter) -> None:
    """The target train split's per-image class counts (image-level labels) and the seed's
    points, as `adapt-deploy data stats` and `data points --seed` write them: the simulated
    annotator of the adapted method. Kept beside the data, so they go when it is rewritten."""
    with StageProgress(reporter) as progress:
        if not stats_path(target, "train").is_file():
            count = partial(progress, "counting class pixels")
            write_class_stats(target, "cityscapes", "train", progress=count)
        if not points_path(target, "train", seed).is_file():
            draw = partial(progress, "drawing points")
            write_points(target, "cityscapes", "train", seed, progress=draw)


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
