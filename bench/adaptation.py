"""The paper's table on the synthetic benchmark: every method, the same budget, several seeds.
Writes bench/results/adaptation.md (mIoU mean ± std and gap closed per method).

    python -m bench.adaptation [--work DIR] [--seeds 0 1 2] [--methods ...] [--set key=value]
                               [--name adaptation]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from adapt_deploy.config import METHODS
from adapt_deploy.data.synthetic_writer import SynthSpec, write_benchmark
from adapt_deploy.data.weak import points_path, stats_path, write_class_stats, write_points
from adapt_deploy.demo import demo_config
from adapt_deploy.engine.train import train
from adapt_deploy.progress import RichReporter
from bench.common import write_results

PAPER = {  # GTA5 -> Cityscapes, DeepLab-v2 ResNet-101 (Paul et al., ECCV 2020)
    "source_only": 36.6, "adaptsegnet": 42.4, "wda_uda": 48.2, "wda_image": 53.0,
    "wda_point": 56.4, "oracle": 64.0,
}  # fmt: skip


def run(work: Path, seeds: list[int], methods: list[str], overrides: list[str]) -> dict:
    """Train every (method, seed) into work/runs (finished runs are reused) and collect mIoU."""
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
    for method in methods:
        for seed in seeds:
            run_dir = work / "runs" / f"{method}_seed{seed}"
            done = run_dir / "result.json"
            if done.is_file():
                results.setdefault(method, {})[seed] = json.loads(done.read_text())
                continue
            config = demo_config(
                method, data, [f"train.seed={seed}", f"adapt.point_seed={seed}", *overrides]
            )
            reporter.log(f"{method} seed {seed} -> {run_dir}")
            start = time.perf_counter()
            interrupted = (run_dir / "trainer_state.pt").is_file()  # continue a killed run
            result = train(config, run_dir, reporter=reporter, resume=interrupted)
            record = {"miou": 100 * result.evaluation.miou, "seconds": time.perf_counter() - start}
            done.write_text(json.dumps(record))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/.work/adaptation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="adaptation", help="results file: bench/results/NAME.md")
    args = parser.parse_args()
    results = run(args.work, args.seeds, args.methods, args.overrides)
    body = (
        "Synthetic benchmark, demo settings (`configs/synthetic/*.yaml`), target val split.\n"
        f"Overrides: {args.overrides or 'none'}.\n\n" + table(results)
    )
    path = write_results(args.name, "Adaptation methods on the synthetic benchmark", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
