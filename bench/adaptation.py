"""The paper's table on the synthetic benchmark: every method, the same budget, several seeds.
Writes bench/results/adaptation.md (mIoU mean ± std and gap closed per method).

    python -m bench.adaptation [--work DIR] [--seeds 0 1 2] [--methods ...] [--set key=value]
                               [--protocol finetune|scratch] [--name adaptation] [--threads N]

Finished runs are reused (work/runs/METHOD_seedS/result.json), so one process per seed
(`--seeds S --threads 1`, after a first call has written the data and labels) can share a work
dir on a multi-core machine; a last call with every seed then only collects the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adapt_deploy.config import METHODS, ExperimentConfig
from adapt_deploy.data.synthetic.styles import RECOLOURED_CLASSES
from adapt_deploy.data.synthetic_writer import SynthSpec, write_benchmark
from adapt_deploy.data.weak import points_path, stats_path, write_class_stats, write_points
from adapt_deploy.demo import ADAPT_STAGE, demo_config
from adapt_deploy.engine.train import train
from adapt_deploy.progress import RichReporter
from bench.common import write_results

PAPER = {  # GTA5 -> Cityscapes, DeepLab-v2 ResNet-101 (Paul et al., ECCV 2020)
    "source_only": 36.6, "adaptsegnet": 42.4, "wda_uda": 48.2, "wda_image": 53.0,
    "wda_point": 56.4, "oracle": 64.0,
}  # fmt: skip


def _train_once(
    run_dir: Path, config: ExperimentConfig, reporter: RichReporter, label: str
) -> dict:
    """Train `config` into `run_dir` unless its result.json exists; continue a killed run."""
    done = run_dir / "result.json"
    if not done.is_file():
        reporter.log(f"{label} -> {run_dir}")
        start = time.perf_counter()
        interrupted = (run_dir / "trainer_state.pt").is_file()
        result = train(config, run_dir, reporter=reporter, resume=interrupted)
        record = {"miou": 100 * result.evaluation.miou, "seconds": time.perf_counter() - start}
        done.write_text(json.dumps(record))
    record = json.loads(done.read_text())
    record["iou"] = json.loads((run_dir / "eval.json").read_text())["iou"]  # class -> IoU or None
    return record


def run(
    work: Path, seeds: list[int], methods: list[str], overrides: list[str], protocol: str
) -> dict:
    """Train every (method, seed) into work/runs (finished runs are reused) and collect mIoU.

    protocol "finetune": per seed a source-only model is trained first (runs/pretrain_seedS) and
    every method, source_only and oracle included, starts from it for the same adaptation stage
    (ADAPT_STAGE); "scratch": every method trains from random weights with the demo config.
    """
    reporter = RichReporter()
    data = work / "data"
    write_benchmark(data, SynthSpec())
    target = data / "target"
    if not stats_path(target, "train").is_file():
        write_class_stats(target, "cityscapes", "train")
    for seed in seeds:
        if not points_path(target, "train", seed).is_file():
            write_points(target, "cityscapes", "train", seed)
    results: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        seeded = [f"train.seed={seed}", f"adapt.point_seed={seed}"]
        stage = seeded + overrides
        if protocol == "finetune":
            pretrain = work / "runs" / f"pretrain_seed{seed}"
            config = demo_config("source_only", data, seeded)
            _train_once(pretrain, config, reporter, f"source-only pretraining, seed {seed}")
            stage = [f"model.init={pretrain / 'checkpoint.pt'}", *ADAPT_STAGE, *stage]
        for method in methods:
            run_dir = work / "runs" / f"{method}_seed{seed}"
            config = demo_config(method, data, stage)
            record = _train_once(run_dir, config, reporter, f"{method} seed {seed}")
            results.setdefault(method, {})[seed] = record
    return results


def table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: mIoU mean ± std, gap closed, seconds, and the paper's numbers beside them."""
    mean = {m: statistics.mean(r["miou"] for r in runs.values()) for m, runs in results.items()}
    header = "| method | mIoU (mean ± std) | seeds | gap closed | s/run | paper mIoU | paper gap |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    so, orc = mean.get("source_only"), mean.get("oracle")
    p_so, p_or = PAPER["source_only"], PAPER["oracle"]
    for method in sorted(results, key=METHODS.index):
        runs = results[method]
        values = [r["miou"] for r in runs.values()]
        spread = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "n/a (1 seed)"
        gap = "-"
        if so is not None and orc is not None and orc != so:
            gap = f"{(mean[method] - so) / (orc - so):.0%}"
        secs = statistics.mean(r["seconds"] for r in runs.values())
        paper = PAPER.get(method)
        paper_gap = f"{(paper - p_so) / (p_or - p_so):.0%}" if paper is not None else "-"
        lines.append(
            f"| {method} | {mean[method]:.1f} ± {spread} | {len(values)} | {gap} | {secs:.0f} "
            f"| {paper if paper is not None else '-'} | {paper_gap} |"
        )
    return "\n".join(lines) + "\n"


def group_table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: mIoU and gap closed over the camera-toned classes and the recoloured ones."""
    groups = {"camera-toned classes": False, "recoloured classes": True}
    mean: dict[str, dict[str, float]] = {}
    for method, runs in results.items():
        for group, recoloured in groups.items():
            per_seed = []
            for record in runs.values():
                values = [
                    v
                    for name, v in record["iou"].items()
                    if v is not None and (name in RECOLOURED_CLASSES) == recoloured
                ]
                per_seed.append(statistics.mean(values))
            mean.setdefault(method, {})[group] = statistics.mean(per_seed)
    header = "| method | " + " | ".join(f"{g}: mIoU | gap closed" for g in groups) + " |"
    lines = [header, "|---|" + "---|---|" * len(groups)]
    for method in sorted(results, key=METHODS.index):
        cells = []
        for group in groups:
            value, gap = mean[method][group], "-"
            if "source_only" in mean and "oracle" in mean:
                so, orc = mean["source_only"][group], mean["oracle"][group]
                gap = f"{(value - so) / (orc - so):.0%}".replace("-0%", "0%") if orc != so else "-"
            cells += [f"{value:.1f}", gap]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/.work/adaptation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="adaptation", help="results file: bench/results/NAME.md")
    parser.add_argument(
        "--protocol",
        choices=("finetune", "scratch"),
        default="finetune",
        help="finetune: every method starts from the seed's source-only model (default)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.work, args.seeds, args.methods, args.overrides, args.protocol)
    stage = (
        f"every method starts from the seed's source-only model (demo config, from scratch) and "
        f"trains with {' '.join(ADAPT_STAGE)}"
        if args.protocol == "finetune"
        else "every method trains from random weights with the demo config"
    )
    body = (
        "Synthetic benchmark, `configs/synthetic/*.yaml`, target val split. Protocol "
        f"{args.protocol}: {stage}. Overrides: {args.overrides or 'none'}.\n\n" + table(results)
    )
    body += (
        "\nBy class group (mean over seeds): the recoloured classes "
        f"({', '.join(RECOLOURED_CLASSES)}) change appearance outright in the target; the others "
        "only through the target camera's tone, texture and geometry.\n\n" + group_table(results)
    )
    path = write_results(args.name, "Adaptation methods on the synthetic benchmark", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
