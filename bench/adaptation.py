"""The paper's table on the synthetic benchmark: every method, the same budget, several seeds.
Writes bench/results/adaptation.md (mIoU mean ± std and gap closed per method).

    python -m bench.adaptation [--work DIR] [--seeds 0 1 2] [--methods ...] [--set key=value]
                               [--protocol finetune|scratch] [--name adaptation] [--threads N]

Finished runs are reused when they hold exactly this call's config (work/runs/METHOD_seedS/
config.yaml, eval.json, seconds.json: adapt_deploy.demo's test) and, under --protocol finetune,
started from the seed's current source-only model (pretrain_seedS trained again makes every run
of that seed stale); a killed run of the same config is continued; anything else is trained
afresh. So one process per seed (`--seeds S --threads 1`, after a first call has written the
data and labels) can share a work dir on a multi-core machine; a last call with every seed then
only collects the tables. `--collect` trains nothing: it tabulates the finished runs and names
the (method, seed) pairs that have none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import torch
import yaml

from adapt_deploy.adapt.labor import LABELS_DIR
from adapt_deploy.adapt.labor import SUMMARY_FILE as LABOR_SUMMARY
from adapt_deploy.adapt.ranking import RANK_FILE, rank_target
from adapt_deploy.bundle.meta import sha256_file
from adapt_deploy.config import METHODS, ExperimentConfig
from adapt_deploy.data.synthetic.styles import RECOLOURED_CLASSES
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.data.weak import (
    ClassStats,
    load_points,
    points_path,
    stats_path,
    write_class_stats,
    write_points,
)
from adapt_deploy.demo import ADAPT_STAGE, completed_run, demo_config
from adapt_deploy.engine.evaluate import EvalResult
from adapt_deploy.engine.train import TRAINER_STATE, train
from adapt_deploy.progress import RichReporter
from bench.common import write_results

# GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, mIoU as reported: WDA's table (Paul et al., ECCV
# 2020) for its own rows, source-only, AdaptSegNet and the oracle; CBST and CRST-MRKLD from the
# CRST paper (Zou et al., ICCV 2019), CRST-LRENT from its official code's README (46.51),
# IntraDA (Pan et al., CVPR 2020) and DACS (Tranheden et al., WACV 2021) for selftrain.
PAPER = {
    "source_only": 36.6, "adaptsegnet": 42.4, "cbst": 45.9, "crst_mrkld": 47.1,
    "crst_lrent": 46.5, "intrada": 46.3, "wda_uda": 48.2, "wda_image": 53.0, "wda_point": 56.4,
    "selftrain": 52.1, "oracle": 64.0,
}  # fmt: skip


SECONDS_FILE = "seconds.json"  # {"train_seconds": s}, as adapt_deploy.demo writes it
INIT_FILE = "init.sha256"  # sha256 of the checkpoint the run started from (model.init)

# Rows that train a method with the label budget of another row of the same seed: the LabOR
# baselines at SPL's budget (the pixels per image labor_spl asked for, rounded).
BUDGET_OF = {"labor_random@spl": "labor_spl", "labor_entropy@spl": "labor_spl"}
# Rows on the benchmark written with a second, SYNTHIA-layout source (`synth --sources
# gta5,synthia`; the same GTA5-layout source and target): multi-source training, and
# AdaptSegNet from that second source alone (the plain `adaptsegnet` row is the first alone).
MULTI_SOURCE_ROWS = ("multisource", "adaptsegnet@synthia")
MULTI_SOURCE_DATA = "data_multisource"
ROWS = (*METHODS, *BUDGET_OF, "adaptsegnet@synthia")  # what --methods accepts, in table order


def _train_once(
    run_dir: Path,
    config: ExperimentConfig,
    reporter: RichReporter,
    label: str,
    stale: bool = False,
) -> tuple[dict, bool]:
    """The record (mIoU, seconds, IoU per class) of `config` trained into `run_dir`, and
    whether it was trained now.

    A finished run there is reused when it holds exactly this config (adapt_deploy.demo's
    `completed_run`: config.yaml equal to `config`), unless `stale` (what it starts from was
    trained again in this call) or the checkpoint it started from changed since; a killed run
    of the same config is continued; anything else there is deleted and trained afresh.
    """
    _adopt_legacy_run(run_dir)
    stale = stale or _init_changed(run_dir, config)
    cached = None if stale else completed_run(run_dir, config)
    if cached is not None:
        return _record(*cached), False
    resume = (
        not stale
        and (run_dir / TRAINER_STATE).is_file()
        and not (run_dir / "eval.json").is_file()
        and _same_config(run_dir, config)
    )
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    reporter.log(f"{label} -> {run_dir}" + (" (continuing a killed run)" if resume else ""))
    result = train(config, run_dir, reporter=reporter, resume=resume)
    assert result.evaluation is not None
    if config.model.init:
        (run_dir / INIT_FILE).write_text(sha256_file(Path(config.model.init)) + "\n")
    (run_dir / SECONDS_FILE).write_text(json.dumps({"train_seconds": result.seconds}))
    return _record(result.evaluation, result.seconds), True


def _record(evaluation: EvalResult, seconds: float) -> dict:
    return {
        "miou": 100 * evaluation.miou,
        "seconds": seconds,
        "iou": evaluation.to_dict()["iou"],  # class -> IoU in percent, or None
    }


def _same_config(run_dir: Path, config: ExperimentConfig) -> bool:
    """The run's config.yaml is `config` (the comparison adapt_deploy.demo makes)."""
    path = run_dir / "config.yaml"
    return path.is_file() and yaml.safe_load(path.read_text()) == config.to_dict()


def _init_changed(run_dir: Path, config: ExperimentConfig) -> bool:
    """The run recorded the checkpoint it started from, and that file differs now."""
    recorded, init = run_dir / INIT_FILE, config.model.init
    if not (init and recorded.is_file() and Path(init).is_file()):
        return False
    return recorded.read_text().strip() != sha256_file(Path(init))


def _adopt_legacy_run(run_dir: Path) -> None:
    """Runs of earlier versions of this benchmark recorded result.json ({miou, seconds}, the
    seconds being train()'s wall time, evaluation included) instead of seconds.json: write the
    seconds.json the reuse test reads, so a finished run of the same config is still reused."""
    legacy, seconds = run_dir / "result.json", run_dir / SECONDS_FILE
    if legacy.is_file() and (run_dir / "eval.json").is_file() and not seconds.is_file():
        record = json.loads(legacy.read_text())
        seconds.write_text(json.dumps({"train_seconds": record["seconds"]}))


def run(
    work: Path, seeds: list[int], methods: list[str], overrides: list[str], protocol: str
) -> dict:
    """Train every (method, seed) into work/runs (finished runs of the same config and
    starting point are reused) and collect mIoU.

    protocol "finetune": per seed a source-only model is trained first (runs/pretrain_seedS) and
    every method, source_only and oracle included, starts from it for the same adaptation stage
    (ADAPT_STAGE); "scratch": every method trains from random weights with the demo config.
    """
    reporter = RichReporter()
    data = work / "data"
    write_benchmark(data, SynthSpec())
    if any(row in MULTI_SOURCE_ROWS for row in methods):
        write_benchmark(work / MULTI_SOURCE_DATA, SynthSpec(sources=("gta5", "synthia")))
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
        retrained = False
        if protocol == "finetune":
            pretrain = work / "runs" / f"pretrain_seed{seed}"
            config = demo_config("source_only", data, seeded)
            _, retrained = _train_once(
                pretrain, config, reporter, f"source-only pretraining, seed {seed}"
            )
            stage = [f"model.init={pretrain / 'checkpoint.pt'}", *ADAPT_STAGE, *stage]
        trained: dict[str, bool] = {}
        for method in methods:
            run_dir = _run_dir(work, method, seed)
            method_stage = stage
            if method == "intrada":
                method_stage = _intrada_stage(work, data, seed, stage, reporter, retrained, trained)
            if method in BUDGET_OF and not _finished(work, BUDGET_OF[method], seed):
                reporter.log(f"{method} seed {seed} needs {BUDGET_OF[method]} seed {seed} first")
                continue
            config = _row_config(work, method, seed, method_stage)
            record, trained[method] = _train_once(
                run_dir, config, reporter, f"{method} seed {seed}", stale=retrained
            )
            record["labelled"] = label_cost(method, run_dir, data, seed)
            results.setdefault(method, {})[seed] = record
    return results


def _row_config(work: Path, row: str, seed: int, stage: list[str]) -> ExperimentConfig:
    """The config a table row trains: its method's demo config on its data, at `stage`, with
    the budget of another row or the second source where the row says so."""
    method = _method_of(row)
    multi = row in MULTI_SOURCE_ROWS
    data = work / (MULTI_SOURCE_DATA if multi else "data")
    extra = _budget(work, row, seed)
    if row == "adaptsegnet@synthia":  # the multi-source config's SYNTHIA-layout entry
        second = demo_config("multisource", data).data.sources[1]
        extra.append(f"data.source={json.dumps(dataclasses.asdict(second))}")
    return demo_config(method, data, stage + extra)


def _run_dir(work: Path, row: str, seed: int) -> Path:
    return work / "runs" / f"{row.replace('@', '-at-')}_seed{seed}"


def _method_of(row: str) -> str:
    """The registered method a table row trains (`labor_random@spl`: labor_random)."""
    return row.split("@", 1)[0]


def _finished(work: Path, row: str, seed: int) -> bool:
    return (_run_dir(work, row, seed) / "eval.json").is_file()


def _budget(work: Path, row: str, seed: int) -> list[str]:
    """labor.budget for a row at another row's budget: what that row's run asked per image."""
    if row not in BUDGET_OF:
        return []
    asked = _labor_summary(_run_dir(work, BUDGET_OF[row], seed))["asked_per_image"]
    return [f"labor.budget={max(1, round(asked))}"]


def _labor_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / LABELS_DIR / LABOR_SUMMARY).read_text())


def label_cost(row: str, run_dir: Path, data: Path, seed: int) -> float | None:
    """Target pixels per image a method's labels cost: asked (labor_*), the points of the
    seed's set (*_point), every labelled pixel (oracle); 0 for image-level labels or none."""
    method = _method_of(row)
    target = data / "target"
    if method.startswith("labor_"):
        summary = run_dir / LABELS_DIR / LABOR_SUMMARY
        return _labor_summary(run_dir)["asked_per_image"] if summary.is_file() else None
    if method.endswith("_point"):
        path = points_path(target, "train", seed)
        if not path.is_file():
            return None
        points, _ = load_points(path)
        return sum(len(p) for p in points.values()) / max(len(points), 1)
    if method == "oracle":
        path = stats_path(target, "train")
        return float(ClassStats.load(path).counts.sum(axis=1).mean()) if path.is_file() else None
    return 0.0


def _intrada_stage(
    work: Path,
    data: Path,
    seed: int,
    stage: list[str],
    reporter: RichReporter,
    retrained: bool,
    trained: dict[str, bool],
) -> list[str]:
    """IntraDA's pipeline: the seed's AdvEnt run (the inter-domain model, trained here if this
    call has not), its entropy ranking of the target train split (made again when AdvEnt was
    retrained), then intrada continues the AdvEnt model on the ranked split."""
    advent_dir = work / "runs" / f"advent_seed{seed}"
    if "advent" not in trained:
        config = demo_config("advent", data, stage)
        _, trained["advent"] = _train_once(
            advent_dir, config, reporter, f"advent seed {seed} (IntraDA's ranking model)", retrained
        )
    checkpoint, rank_dir = advent_dir / "checkpoint.pt", work / "runs" / f"rank_seed{seed}"
    rank_file = rank_dir / RANK_FILE
    fresh = rank_file.is_file() and not trained["advent"]
    if fresh:
        fresh = json.loads(rank_file.read_text())["checkpoint"] == sha256_file(checkpoint)
    if not fresh:
        reporter.log(f"ranking the target by entropy with {checkpoint} -> {rank_dir}")
        rank_target(checkpoint, data / "target", rank_dir, reporter=reporter)
    return _intrada_overrides(work, seed, stage)


def _intrada_overrides(work: Path, seed: int, stage: list[str]) -> list[str]:
    """The stage of intrada: from the seed's AdvEnt model, on its ranking."""
    checkpoint = work / "runs" / f"advent_seed{seed}" / "checkpoint.pt"
    rank_file = work / "runs" / f"rank_seed{seed}" / RANK_FILE
    init = [o for o in stage if not o.startswith("model.init=")]
    return [f"model.init={checkpoint}", f"selftrain.rank={rank_file}", *init]


def collect(
    work: Path, seeds: list[int], methods: list[str], overrides: list[str]
) -> tuple[dict, list[str]]:
    """The finished runs of the finetune protocol that hold exactly this call's config, without
    training anything; and the (method, seed) pairs that have none, for the table's note."""
    data = work / "data"
    results: dict[str, dict[int, dict]] = {}
    missing = []
    for seed in seeds:
        pretrain = work / "runs" / f"pretrain_seed{seed}" / "checkpoint.pt"
        seeded = [f"train.seed={seed}", f"adapt.point_seed={seed}"]
        stage = [f"model.init={pretrain}", *ADAPT_STAGE, *seeded, *overrides]
        for method in methods:
            run_dir = _run_dir(work, method, seed)
            method_stage = _intrada_overrides(work, seed, stage) if method == "intrada" else stage
            if method in BUDGET_OF and not _finished(work, BUDGET_OF[method], seed):
                missing.append(f"{method} seed {seed}")
                continue
            config = _row_config(work, method, seed, method_stage)
            cached = None if _init_changed(run_dir, config) else completed_run(run_dir, config)
            if cached is None:
                missing.append(f"{method} seed {seed}")
            else:
                record = _record(*cached)
                record["labelled"] = label_cost(method, run_dir, data, seed)
                results.setdefault(method, {})[seed] = record
    return results, missing


def table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: mIoU mean ± std, gap closed, seconds, and the paper's numbers beside them."""
    mean = {m: statistics.mean(r["miou"] for r in runs.values()) for m, runs in results.items()}
    header = (
        "| method | mIoU (mean ± std) | seeds | gap closed | labelled px/img | s/run "
        "| × source-only time | paper mIoU | paper gap |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    so_secs = (
        statistics.mean(r["seconds"] for r in results["source_only"].values())
        if "source_only" in results
        else None
    )
    so, orc = mean.get("source_only"), mean.get("oracle")
    p_so, p_or = PAPER["source_only"], PAPER["oracle"]
    for method in sorted(results, key=ROWS.index):
        runs = results[method]
        values = [r["miou"] for r in runs.values()]
        costs = [r.get("labelled") for r in runs.values()]
        cost_cell = "-" if None in costs else f"{statistics.mean(costs):.0f}"
        spread = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "n/a (1 seed)"
        gap = "-"
        if so is not None and orc is not None and orc != so:
            gap = f"{(mean[method] - so) / (orc - so):.0%}"
        secs = statistics.mean(r["seconds"] for r in runs.values())
        paper = PAPER.get(method)
        paper_gap = f"{(paper - p_so) / (p_or - p_so):.0%}" if paper is not None else "-"
        cost = f"{secs / so_secs:.1f}" if so_secs else "-"
        lines.append(
            f"| {method} | {mean[method]:.1f} ± {spread} | {len(values)} | {gap} | {cost_cell} "
            f"| {secs:.0f} "
            f"| {cost} | {paper if paper is not None else '-'} | {paper_gap} |"
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
    for method in sorted(results, key=ROWS.index):
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
    parser.add_argument("--methods", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="adaptation", help="results file: bench/results/NAME.md")
    parser.add_argument(
        "--protocol",
        choices=("finetune", "scratch"),
        default="finetune",
        help="finetune: every method starts from the seed's source-only model (default)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the finished runs of this config, naming the missing ones",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    missing: list[str] = []
    if args.collect:
        if args.protocol != "finetune":
            parser.error("--collect reads runs of the finetune protocol")
        results, missing = collect(args.work, args.seeds, args.methods, args.overrides)
    else:
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
    if missing:
        body += f"\nNot run (no finished run of this config): {', '.join(missing)}.\n"
    body += (
        "\nBy class group (mean over seeds): the recoloured classes "
        f"({', '.join(RECOLOURED_CLASSES)}) change appearance outright in the target; the others "
        "only through the target camera's tone, texture and geometry.\n\n" + group_table(results)
    )
    path = write_results(args.name, "Adaptation methods on the synthetic benchmark", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
