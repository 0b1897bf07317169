"""How good the self-training methods' pseudo-labels are on the synthetic benchmark: precision
and recall against the target train split's ground truth, per class group, for the runs that
bench/adaptation.py left in its work dir. Writes bench/results/pseudo_labels.md.

    python -m bench.pseudo_label_quality [--work bench/.work/adaptation] [--seeds 0 1 2]

- CBST / CRST: every round's label set, as the run trained on it;
- IntraDA: the easy split's labels from the AdvEnt model's ranking;
- selftrain*: the EMA teacher's confident pixels (max probability above selftrain.confidence)
  at the run's start (the pretrained model) and end (the teacher in trainer_state.pt), before
  ClassMix and before the weak variants' corrections.

Precision: the share of labelled pixels of a group whose label is right. Recall: the share of
the group's ground-truth pixels that carry the right label.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import yaml

from adapt_deploy.adapt.pseudo_labelling import predict
from adapt_deploy.adapt.self_training import ROUNDS_DIR
from adapt_deploy.config import DatasetConfig, ExperimentConfig, from_dict
from adapt_deploy.data import pseudo_labels as files
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.synthetic.styles import RECOLOURED_CLASSES
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX, label_ids_to_train_ids
from adapt_deploy.models.checkpoints import build_model, read_checkpoint
from bench.common import write_results

CBST_FAMILY = ("cbst", "crst_mrkld", "crst_lrent")
TEACHER_FAMILY = ("selftrain", "selftrain_image", "selftrain_point")
NUM_CLASSES = len(CLASS_NAMES)
GROUPS = {
    "camera-toned": [c for c in range(NUM_CLASSES) if CLASS_NAMES[c] not in RECOLOURED_CLASSES],
    "recoloured": [c for c in range(NUM_CLASSES) if CLASS_NAMES[c] in RECOLOURED_CLASSES],
}


class Quality:
    """Per-class pixel counts of a label set against the ground truth."""

    def __init__(self) -> None:
        self.labelled = np.zeros(NUM_CLASSES, np.int64)  # pixels labelled as c
        self.correct = np.zeros(NUM_CLASSES, np.int64)  # ... whose ground truth is c
        self.truth = np.zeros(NUM_CLASSES, np.int64)  # ground-truth pixels of c
        self.pixels = 0  # ground-truth labelled pixels

    def add(self, labels: np.ndarray, truth: np.ndarray) -> None:
        valid = truth != IGNORE_INDEX
        kept = valid & (labels != IGNORE_INDEX)
        self.labelled += np.bincount(labels[kept], minlength=NUM_CLASSES)[:NUM_CLASSES]
        right = kept & (labels == truth)
        self.correct += np.bincount(truth[right], minlength=NUM_CLASSES)[:NUM_CLASSES]
        self.truth += np.bincount(truth[valid], minlength=NUM_CLASSES)[:NUM_CLASSES]
        self.pixels += int(valid.sum())

    def row(self) -> list[str]:
        """Labelled share, then precision and recall per group, in percent."""
        cells = [f"{100 * self.labelled.sum() / max(self.pixels, 1):.0f}%"]
        for classes in GROUPS.values():
            labelled, correct = self.labelled[classes].sum(), self.correct[classes].sum()
            truth = self.truth[classes].sum()
            cells += [_percent(correct, labelled), _percent(correct, truth)]
        return cells


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def score_files(target: Path, folder: Path, names: Iterable[str]) -> Quality:
    """A pseudo-label set on disk (Cityscapes layout) against the target's train labels."""
    quality = Quality()
    for name in names:
        truth = _truth(target, name)
        quality.add(files.read_label(folder, "train", name, truth.shape), truth)
    return quality


def _truth(root: Path, name: str) -> np.ndarray:
    """The target's ground truth of sample `name` in trainIds, at its own size (read once)."""
    return label_ids_to_train_ids(files.read_png(files.label_path(root, "train", name), np.uint8))


@torch.no_grad()
def score_network(
    network: torch.nn.Module, config: ExperimentConfig, target: Path, limit: int | None = None
) -> Quality:
    """A network's confident argmax (max probability above selftrain.confidence) over the
    target train split."""
    tau = config.selftrain.confidence
    entry = DatasetConfig(config.data.target.kind, str(target), "train", config.data.target.size)
    dataset = build_dataset(entry, labels=False)
    quality = Quality()
    network.eval()
    for index, sample in enumerate(dataset.samples[:limit]):
        truth = _truth(target, sample.name)
        image = dataset[index]["image"].unsqueeze(0)  # type: ignore[union-attr]
        confidence, classes = predict(network, image, config.input, truth.shape).max(dim=1)
        labels = np.where(confidence[0].numpy() > tau, classes[0].numpy(), IGNORE_INDEX)
        quality.add(labels.astype(np.uint8), truth)
    return quality


def _network(config: ExperimentConfig, weights: dict) -> torch.nn.Module:
    network = build_model(config.model)
    network.load_state_dict(weights)
    return network


def run_sets(
    work: Path, seed: int, limit: int | None = None
) -> Iterable[tuple[str, str, Callable[[], Quality]]]:
    """(run, label set, how to score it) for every self-training run of the seed in `work`,
    over the first `limit` images of each set (all when None)."""
    runs, target = work / "runs", work / "data" / "target"
    for method in CBST_FAMILY:
        run = runs / f"{method}_seed{seed}"
        for folder in sorted((run / ROUNDS_DIR).glob("round_*")):
            summary = files.read_summary(folder)
            if summary is None:
                continue
            found = _names_in(folder)
            label = f"{folder.name} (top {summary['portion']:.0%} per class)"
            yield run.name, label, lambda f=folder, n=found[:limit]: score_files(target, f, n)
    rank = runs / f"rank_seed{seed}" / "rank.json"
    if rank.is_file():
        record = json.loads(rank.read_text())
        folder = rank.parent / record["pseudo_labels"]
        label = f"easy split ({len(record['easy'])} images, every pixel)"
        easy = record["easy"][:limit]
        yield rank.parent.name, label, lambda: score_files(target, folder, easy)
    for method in TEACHER_FAMILY:
        run = runs / f"{method}_seed{seed}"
        state = run / "trainer_state.pt"
        if not (state.is_file() and (run / "eval.json").is_file()):
            continue
        config = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        tau = config.selftrain.confidence
        teacher = torch.load(state, map_location="cpu", weights_only=True)["method"]["teacher"]
        moments = [("end", teacher)]
        if config.model.init:  # the teacher starts as the model the run starts from
            moments.insert(0, ("start", read_checkpoint(config.model.init)["model"]))
        for when, weights in moments:
            label = f"teacher at the {when}, confidence > {tau}"
            yield (
                run.name,
                label,
                lambda w=weights, c=config: score_network(_network(c, w), c, target, limit),
            )


def _names_in(folder: Path) -> list[str]:
    """The samples ("city/stem") a label set holds labels of."""
    suffix = files.LABEL_SUFFIX
    paths = sorted((folder / "gtFine" / "train").rglob("*" + suffix))
    return [f"{p.parent.name}/{p.name[: -len(suffix)]}" for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/.work/adaptation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--name", default="pseudo_labels", help="bench/results/NAME.md")
    parser.add_argument("--images", type=int, default=None, help="score the first N per set")
    args = parser.parse_args()
    groups = " | ".join(f"{g}: precision | recall" for g in GROUPS)
    lines = [f"| run | labels | labelled share | {groups} |", "|---|---|---|" + "---|---|" * 2]
    for seed in args.seeds:
        for run, label, score in run_sets(args.work, seed, args.images):
            print(f"scoring {run}: {label}", flush=True)
            lines.append(f"| {run} | {label} | " + " | ".join(score().row()) + " |")
    body = (
        f"Pseudo-labels of the self-training runs in `{args.work}` "
        f"({'every image' if args.images is None else f'the first {args.images} images'} of "
        "each set) against the synthetic "
        "target's train labels (precision and recall in %; recoloured classes: "
        f"{', '.join(RECOLOURED_CLASSES)}).\n\n" + "\n".join(lines) + "\n"
    )
    path = write_results(args.name, "Pseudo-label quality of the self-training methods", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
