"""IntraDA's entropy ranking (Pan et al., CVPR 2020): split the target by how sure an
inter-domain adapted model is of it.

Each target image is scored by the mean normalized entropy of the model's prediction; the
`easy_share` (lambda, 0.67 in the paper) least uncertain images form the easy split, the rest
the hard one. The easy split's argmax predictions become its pseudo-labels (every pixel, as the
official code keeps them), so intra-domain adaptation can treat it as a labelled source.

    OUT/scores.jsonl     each image's score as it is computed (a header line says for which
                         checkpoint, data and split), so a stopped or crashed run continues
                         where it was: a run into the same OUT scores only what is missing
    OUT/pseudo_labels/   the easy split's labels (Cityscapes layout, data/pseudo_labels.py;
                         resumable too)
    OUT/rank.json        written last: checkpoint sha256, split, lambda, easy and hard names
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from adapt_deploy.adapt.pseudo_labelling import (
    PseudoLabelJob,
    checkpoint_on_split,
    predict,
    write_pseudo_labels,
)
from adapt_deploy.atomic import atomic_write, atomic_write_json
from adapt_deploy.bundle.meta import sha256_file
from adapt_deploy.config import InputConfig
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.errors import UserError
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.progress import Reporter

RANK_FILE = "rank.json"
SCORES_FILE = "scores.jsonl"
LABELS_DIR = "pseudo_labels"


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per image (N,) the mean over pixels of -Σ_c p log p / log C, in [0, 1]."""
    entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(dim=1)
    return entropy.flatten(1).mean(dim=1) / math.log(probs.shape[1])


def split_by_score(scores: dict[str, float], easy_share: float) -> tuple[list[str], list[str]]:
    """(easy, hard): the round(easy_share * n) lowest scores (ties by name) and the rest, each
    sorted from easiest to hardest."""
    order = sorted(scores, key=lambda name: (scores[name], name))
    cut = round(easy_share * len(order))
    return order[:cut], order[cut:]


@torch.no_grad()
def rank_target(
    checkpoint: Path,
    data: Path,
    out: Path,
    easy_share: float = 0.67,
    kind: str = "cityscapes",
    split: str = "train",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`adapt-deploy rank`: score, split and pseudo-label the target; returns rank.json."""
    if not 0 < easy_share < 1:
        raise UserError(f"--lambda must be between 0 and 1 (the easy share), got {easy_share}")
    reporter = reporter or Reporter()
    out = Path(out)
    model, config, dataset = checkpoint_on_split(checkpoint, data, kind, split)
    digest = sha256_file(Path(checkpoint))
    header = {"checkpoint": digest, "data": str(Path(data).resolve()), "kind": kind, "split": split}
    scores = _score_split(model, dataset, config.input, out / SCORES_FILE, header, reporter)
    easy, hard = split_by_score(scores, easy_share)
    if not easy or not hard:
        raise UserError(
            f"--lambda {easy_share} leaves the {'easy' if not easy else 'hard'} split of "
            f"{len(scores)} images empty; choose a lambda that splits it"
        )
    job = PseudoLabelJob(
        model, dataset.subset(easy), config.input, split, 1.0, f"checkpoint sha256 {digest}"
    )
    write_pseudo_labels(job, out / LABELS_DIR, reporter)
    record = {
        "checkpoint": digest,
        "data": str(data),
        "kind": kind,
        "split": split,
        "lambda": easy_share,
        "pseudo_labels": LABELS_DIR,
        "easy": easy,
        "hard": hard,
        "scores": scores,
    }
    atomic_write_json(out / RANK_FILE, record)
    return record


def _score_split(
    model: DeepLab,
    dataset: SegmentationDataset,
    cfg: InputConfig,
    log: Path,
    header: dict[str, str],
    reporter: Reporter,
) -> dict[str, float]:
    """Every image's normalized entropy, by name: those `log` already holds for this `header`,
    the others computed and appended to it one line each as they come."""
    scores = read_scores(log, header)
    names = {sample.name for sample in dataset.samples}
    scores = {name: score for name, score in scores.items() if name in names}
    todo = [i for i, sample in enumerate(dataset.samples) if sample.name not in scores]
    if scores:
        reporter.log(f"continuing: {len(scores)} of {len(names)} images already scored in {log}")
    device = next(model.parameters()).device
    log.parent.mkdir(parents=True, exist_ok=True)
    # rewritten whole before appending: a line a stop cut off must not run into the next one
    entries = [json.dumps({"name": name, "score": score}) for name, score in scores.items()]
    atomic_write(log, "".join(f"{line}\n" for line in [json.dumps(header), *entries]))
    with (
        log.open("a", encoding="utf-8") as lines,
        reporter.task("ranking the target by entropy", len(todo)),
    ):
        for index in todo:
            name = dataset.samples[index].name
            image = dataset[index]["image"].unsqueeze(0).to(device)  # type: ignore[union-attr]
            probs = predict(model, image, cfg, tuple(image.shape[-2:]))
            scores[name] = round(float(normalized_entropy(probs)[0]), 6)
            lines.write(json.dumps({"name": name, "score": scores[name]}) + "\n")
            lines.flush()  # a stop or crash keeps every image scored so far
            reporter.advance()
    return {sample.name: scores[sample.name] for sample in dataset.samples}


def read_scores(log: Path, header: dict[str, str]) -> dict[str, float]:
    """The scores `log` holds (none when it does not exist), a cut-off last line ignored;
    UserError when it was written for another checkpoint, data or split."""
    if not log.is_file():
        return {}
    lines = log.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}  # created, nothing written yet
    try:
        found = json.loads(lines[0])
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise UserError(f"{log}: not a score log of `adapt-deploy rank`; delete it to rank anew")
    differ = sorted(k for k in header if found.get(k) != header[k])
    if differ:
        raise UserError(
            f"{log} holds scores of another ranking (they differ in {', '.join(differ)}); "
            "choose another --out or delete that directory"
        )
    scores: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
            scores[str(entry["name"])] = float(entry["score"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break  # the line a stop cut off: that image is scored again
            raise UserError(f"{log}, line {number}: expected a name and a score") from None
    return scores


def read_rank(path: Path, init: str | None) -> dict[str, Any]:
    """A rank.json, checked against the run: model.init must be the checkpoint it ranked with
    (IntraDA continues that model). UserError naming the file and what differs."""
    path = Path(path)
    if path.is_dir():
        path = path / RANK_FILE
    if not path.is_file():
        raise UserError(
            f"selftrain.rank: {path} not found; write it with `adapt-deploy rank CKPT --data "
            "TARGET --out DIR` and set selftrain.rank=DIR/rank.json"
        )
    try:
        record = json.loads(path.read_text())
        easy, hard, digest = record["easy"], record["hard"], record["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a rank file of `adapt-deploy rank`") from None
    if not (isinstance(easy, list) and isinstance(hard, list) and easy and hard):
        raise UserError(f"{path}: field 'easy' and 'hard' must be non-empty lists of images")
    if init is None or not Path(init).is_file():
        raise UserError(
            f"intrada continues the model {path} was ranked with: set model.init to that "
            f"checkpoint (sha256 {digest[:12]}...)"
        )
    if sha256_file(Path(init)) != digest:
        raise UserError(
            f"{path} was ranked with another checkpoint (sha256 {digest[:12]}...) than "
            f"model.init {init}: rank again with it, or set model.init to the ranked one"
        )
    record["labels_root"] = str(path.parent / record.get("pseudo_labels", LABELS_DIR))
    return record
