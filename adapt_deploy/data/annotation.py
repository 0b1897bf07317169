"""A labelling round on disk: the pixels suggested to an annotator, their answers, the import.

`adapt-deploy suggest-points` writes a round directory:

    ROUND_DIR/round.json               what was asked: strategy, budget, checkpoint, dataset
    ROUND_DIR/suggestions/NAME.json    per image: {"image": NAME, "size": [height, width],
                                       "pixels": [[x, y], ...], "predicted": [trainId, ...]}
                                       x is the column, y the row, at the image file's resolution
    ROUND_DIR/overlays/NAME.png        the image with the suggested pixels marked
    ROUND_DIR/summary.json             the budget used (written last: the round is complete)
    ROUND_DIR/answers.csv              the annotator's answers (--simulate writes them)

answers.csv has the header `image,x,y,class`; `class` is a class name (`road`) or a trainId
(`0`), or `void` / `255` for a pixel that belongs to no class (it is then not stored).
`adapt-deploy data import-points ROUND_DIR/answers.csv` checks every line against the round and
stores the labels as a point set beside the dataset (data/weak.py's points file format), where
`wda_point`, `selftrain_point` and the `labor_*` methods read them with `adapt.points=NAME`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from adapt_deploy.atomic import atomic_write, atomic_write_json
from adapt_deploy.config import POINT_SET_NAME
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.data.weak import load_points, point_set_path, save_points
from adapt_deploy.errors import DatasetError, UserError
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX

ROUND_FILE = "round.json"
SUMMARY_FILE = "summary.json"
ANSWERS_FILE = "answers.csv"
SUGGESTIONS_DIR = "suggestions"
OVERLAYS_DIR = "overlays"
ROUND_SCHEMA = "adapt-deploy/labelling-round/1"
ANSWER_HEADER = ("image", "x", "y", "class")
VOID_NAMES = ("void", str(IGNORE_INDEX))
MARK_COLOUR = (255, 0, 255)  # RGB magenta: rare in street scenes
MAX_ERRORS = 10  # lines named in one error message


def check_set_name(name: str) -> str:
    """A point set's name as file names allow it; UserError otherwise."""
    if not POINT_SET_NAME.match(name):
        raise UserError(
            f"point set name {name!r}: use letters, digits, '_', '-' or '.' (e.g. round1)"
        )
    return name


def suggestion_path(round_dir: Path, name: str) -> Path:
    return round_dir / SUGGESTIONS_DIR / f"{name}.json"


def start_round(round_dir: Path, record: dict[str, Any]) -> None:
    """Create the round directory with its round.json; a directory holding another round's
    suggestions is refused (its answers may be in progress), the same round is continued."""
    path = round_dir / ROUND_FILE
    record = {"schema": ROUND_SCHEMA, **record}
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != record:
            changed = sorted(
                k for k in record.keys() | existing.keys() if record.get(k) != existing.get(k)
            )
            raise UserError(
                f"{round_dir} holds another labelling round (different {', '.join(changed)}): "
                "choose another --out, or delete it"
            )
        return
    if round_dir.exists() and any(round_dir.iterdir()):
        raise UserError(
            f"{round_dir} is not empty and is not a labelling round: choose another --out"
        )
    (round_dir / SUGGESTIONS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def read_round(round_dir: Path) -> dict[str, Any]:
    """round.json of a round directory; UserError when it is none."""
    path = round_dir / ROUND_FILE
    if not path.is_file():
        raise UserError(f"{round_dir} is not a labelling round ({ROUND_FILE} not found)")
    record = json.loads(path.read_text())
    if record.get("schema") != ROUND_SCHEMA:
        raise UserError(
            f"{path}: not a labelling round of this version (schema {record.get('schema')!r})"
        )
    return record


def write_suggestion(
    round_dir: Path, name: str, size: tuple[int, int], pixels: np.ndarray, predicted: np.ndarray
) -> None:
    """One image's suggested pixels, (K, 2) rows of (y, x), with the model's class at each."""
    record = {
        "image": name,
        "size": [int(size[0]), int(size[1])],
        "pixels": [[int(x), int(y)] for y, x in pixels],
        "predicted": [int(c) for c in predicted],
    }
    atomic_write(suggestion_path(round_dir, name), json.dumps(record))


def read_suggestion(round_dir: Path, name: str) -> dict[str, Any] | None:
    path = suggestion_path(round_dir, name)
    return json.loads(path.read_text()) if path.is_file() else None


def write_overlay(round_dir: Path, name: str, image: np.ndarray, pixels: np.ndarray) -> None:
    """The RGB image with each suggested pixel ringed (points) or tinted (dense masks)."""
    canvas = image.copy()
    if len(pixels) > 200:  # a dense mask (SPL): tint every pixel
        canvas[pixels[:, 0], pixels[:, 1]] = (
            0.4 * canvas[pixels[:, 0], pixels[:, 1]] + 0.6 * np.asarray(MARK_COLOUR)
        ).astype(np.uint8)
    else:
        radius = max(3, min(image.shape[:2]) // 80)
        for y, x in pixels:
            cv2.circle(canvas, (int(x), int(y)), radius, MARK_COLOUR, 1, cv2.LINE_AA)
            canvas[int(y), int(x)] = MARK_COLOUR
    path = round_dir / OVERLAYS_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    assert ok, "PNG encoding failed"
    atomic_write(path, png.tobytes())


def finish_round(round_dir: Path, names: list[str]) -> dict[str, Any]:
    """summary.json: pixels asked per image and in all, from the suggestion files."""
    counts, share = {}, []
    for name in names:
        record = read_suggestion(round_dir, name)
        if record is None:
            raise DatasetError(f"{suggestion_path(round_dir, name)} is missing: rerun the round")
        counts[name] = len(record["pixels"])
        share.append(counts[name] / (record["size"][0] * record["size"][1]))
    total = sum(counts.values())
    summary = {
        "images": len(names),
        "pixels": total,
        "pixels_per_image": total / max(len(names), 1),
        "share_of_pixels": float(np.mean(share)) if share else 0.0,
        "per_image": counts,
    }
    atomic_write_json(round_dir / SUMMARY_FILE, summary)
    return summary


def simulate_answers(round_dir: Path, labelled: SegmentationDataset, names: list[str]) -> Path:
    """answers.csv from the ground truth: what a perfect annotator would answer."""
    samples = {s.name: s for s in labelled.samples}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ANSWER_HEADER)
    for name in names:
        record = read_suggestion(round_dir, name)
        if record is None or name not in samples:
            raise DatasetError(f"cannot simulate answers for {name}: no suggestion or no label")
        truth = labelled.train_ids(samples[name])
        for x, y in record["pixels"]:
            c = int(truth[y, x])
            writer.writerow([name, x, y, "void" if c == IGNORE_INDEX else CLASS_NAMES[c]])
    path = round_dir / ANSWERS_FILE
    atomic_write(path, buffer.getvalue())
    return path


def _parse_class(text: str, num_classes: int) -> int | None:
    """A trainId from a class name or number; IGNORE_INDEX for void; None when unknown."""
    text = text.strip()
    if text.lower() in VOID_NAMES:
        return IGNORE_INDEX
    if text.isdigit():
        value = int(text)
        return value if value < num_classes else None
    names = [n.lower() for n in CLASS_NAMES[:num_classes]]
    return names.index(text.lower()) if text.lower() in names else None


def read_answers(
    path: Path, sizes: dict[str, tuple[int, int]], num_classes: int = len(CLASS_NAMES)
) -> tuple[dict[str, list[list[int]]], int]:
    """Validated answers: {image: [[trainId, y, x], ...]} without void pixels, and the number of
    void answers. Every bad line (unknown image, pixel outside it, unknown class, a pixel
    answered twice) is named with its line number in one UserError."""
    if not path.is_file():
        raise UserError(f"answers file not found: {path}")
    errors: list[str] = []
    points: dict[str, list[list[int]]] = {}
    seen: dict[tuple[str, int, int], int] = {}
    void = 0
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(h.strip().lower() for h in rows[0]) != ANSWER_HEADER:
        raise UserError(f"{path}: line 1 must be the header {','.join(ANSWER_HEADER)}")
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 4:
            errors.append(f"line {line}: expected 4 fields (image,x,y,class), got {len(row)}")
            continue
        name, xs, ys, cls = (cell.strip() for cell in row)
        if name not in sizes:
            errors.append(f"line {line}: unknown image {name!r} (not in this round)")
            continue
        try:
            x, y = int(xs), int(ys)
        except ValueError:
            errors.append(
                f"line {line}: x and y must be whole pixel coordinates, got {xs!r}, {ys!r}"
            )
            continue
        height, width = sizes[name]
        if not (0 <= x < width and 0 <= y < height):
            errors.append(f"line {line}: pixel ({x}, {y}) is outside {name} ({width}x{height})")
            continue
        train_id = _parse_class(cls, num_classes)
        if train_id is None:
            errors.append(
                f"line {line}: unknown class {cls!r} (a class name, 0-{num_classes - 1} or void)"
            )
            continue
        if (name, x, y) in seen:
            errors.append(
                f"line {line}: pixel ({x}, {y}) of {name} was answered on line {seen[name, x, y]}"
            )
            continue
        seen[name, x, y] = line
        if train_id == IGNORE_INDEX:
            void += 1
        else:
            points.setdefault(name, []).append([train_id, y, x])
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise UserError(
            f"{path}: {len(errors)} bad answers:\n" + "\n".join(errors[:MAX_ERRORS]) + more
        )
    return points, void


def round_sizes(round_dir: Path) -> dict[str, tuple[int, int]]:
    """Every suggested image of a round and its (height, width)."""
    folder = round_dir / SUGGESTIONS_DIR
    sizes = {}
    for path in sorted(folder.rglob("*.json")):
        record = json.loads(path.read_text())
        sizes[record["image"]] = (int(record["size"][0]), int(record["size"][1]))
    return sizes


def merge_points(
    base: dict[str, list[list[int]]], extra: dict[str, list[list[int]]]
) -> dict[str, list[list[int]]]:
    """`base` plus `extra`; a pixel labelled in both keeps `extra`'s (the later) answer."""
    merged = {name: list(points) for name, points in base.items()}
    for name, points in extra.items():
        new = {(y, x) for _, y, x in points}
        kept = [p for p in merged.get(name, []) if (p[1], p[2]) not in new]
        merged[name] = kept + [list(p) for p in points]
    return merged


def import_points(
    answers: Path, name: str | None = None, previous: str | None = None, force: bool = False
) -> tuple[Path, dict[str, Any]]:
    """`adapt-deploy data import-points`: validate a round's answers and store them as the
    point set `name` (default: the round directory's name) of the round's dataset, with the
    points of the set `previous` (earlier rounds) carried in. An existing set of that name is
    only replaced with `force`. Returns the file and counts."""
    round_dir = answers.parent
    record = read_round(round_dir)
    name = check_set_name(name or round_dir.name)
    data = record["data"]
    target = point_set_path(data["root"], data["split"], name)
    if target.exists() and not force:
        raise UserError(
            f"point set {name!r} exists ({target}): choose another --name, or --force to replace it"
        )
    sizes = round_sizes(round_dir)
    points, void = read_answers(answers, sizes, record.get("num_classes", len(CLASS_NAMES)))
    all_points: dict[str, list[list[int]]] = {n: [] for n in sizes}
    all_sizes = {n: list(s) for n, s in sizes.items()}
    if previous:
        old_points, old_sizes = load_points(
            point_set_path(data["root"], data["split"], check_set_name(previous))
        )
        all_points.update(old_points)
        all_sizes.update(old_sizes)
    all_points = merge_points(all_points, points)
    save_points(all_points, all_sizes, target)
    counts = {
        "images": len(all_points),
        "labelled": sum(len(p) for p in points.values()),
        "void": void,
        "total": sum(len(p) for p in all_points.values()),
    }
    return target, counts
