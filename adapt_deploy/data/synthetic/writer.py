"""Write the synthetic benchmark to disk in the GTA5 and Cityscapes layouts, plus videos.

out/
  source/images/00001.png, source/labels/00001.png       GTA5 layout ('P' PNG of labelIds)
  target/leftImg8bit/{split}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
  target/gtFine/{split}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png
  videos/{name}.mp4, videos/{name}.json, videos/{name}/labels/{frame:06d}.png (trainIds)
  synthia/RGB/0000000.png, synthia/GT/LABELS/0000000.png  with sources gta5,synthia only: a
                                                          second source, SYNTHIA-RAND-CITYSCAPES
                                                          layout (16-bit, class id in R)
  synth.json                                              written last: marks a complete set

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
file under its final name; synth.json's presence means the whole benchmark is complete.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from adapt_deploy.atomic import atomic_write, atomic_write_json
from adapt_deploy.data.synthetic import (
    DEFAULT_SCHEDULE,
    ego_vehicle_mask,
    render_image,
    render_video,
    scale_schedule,
)
from adapt_deploy.errors import UserError
from adapt_deploy.labels import (
    CITYSCAPES_LABEL_TO_TRAIN,
    CLASS_NAMES,
    EGO_VEHICLE_LABEL_ID,
    PALETTE,
    SYNTHIA_16_CLASSES,
    SYNTHIA_LABEL_TO_TRAIN,
    lookup_table,
    train_ids_to_label_ids,
)

MANIFEST = "synth.json"
TRAIN_CITIES: tuple[str, ...] = ("synthaachen", "synthbremen")
VAL_CITIES: tuple[str, ...] = ("synthfrankfurt",)
VAL_INDEX_OFFSET = 1_000_000  # target val image j is render_image(seed, "target", OFFSET + j)
CITYSCAPES_FRAME = 19  # the annotated frame of a Cityscapes snippet
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]
_KNOWN_ENTRIES = ("source", "target", "videos", "synthia", MANIFEST)
# The labelled sources `synth --sources` may name: gta5 (source/, always written) and synthia.
SOURCE_NAMES: tuple[str, ...] = ("gta5", "synthia")
DEFAULT_SOURCES: tuple[str, ...] = ("gta5",)
SYNTHIA_DIR = "synthia"
# trainId -> SYNTHIA class id for the 16 classes SYNTHIA labels; every other trainId (terrain,
# truck, train and 255) becomes 0, SYNTHIA's void.
TRAIN_TO_SYNTHIA_LUT = lookup_table(
    {t: s for s, t in SYNTHIA_LABEL_TO_TRAIN.items() if t in SYNTHIA_16_CLASSES}
)
TRAIN_TO_SYNTHIA_LUT[TRAIN_TO_SYNTHIA_LUT == 255] = 0
# Bumped whenever the renderer draws different pixels for the same spec: a benchmark written by
# another renderer is never silently reused. 2: the target palette is the source's through the
# target camera's tone, plus a few recoloured classes (1 coloured classes like other classes).
RENDERER_VERSION = 2

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SynthSpec:
    """Sizes and counts of a synthetic benchmark; with the tool version it defines the files."""

    seed: int = 0
    num_source: int = 600  # source (GTA5 layout)
    num_target_train: int = 400  # target train split (Cityscapes layout)
    num_target_val: int = 150  # target val split
    source_size: tuple[int, int] = (288, 512)  # (H, W), 16:9 like GTA5
    target_size: tuple[int, int] = (256, 512)  # (H, W), 2:1 like Cityscapes
    num_videos: int = 1
    video_frames: int = 300
    video_fps: float = 15.0
    # The labelled sources: gta5 always; synthia adds a second one of num_source images in the
    # SYNTHIA layout (synthia_size). The default writes (and records) exactly what it did before.
    sources: tuple[str, ...] = DEFAULT_SOURCES

    def __post_init__(self) -> None:
        """UserError naming the option (as `adapt-deploy synth` spells it) of a bad count."""
        parse_sources(",".join(self.sources))
        counts = ("num_source", "num_target_train", "num_target_val", "num_videos")
        for name in counts:
            _require(name, getattr(self, name), 0, "0 or more")
        _require("video_frames", self.video_frames, 1, "1 or more")
        for name in ("source_size", "target_size"):
            size = getattr(self, name)
            if len(size) != 2 or min(size) < 16:
                raise UserError(f"SynthSpec.{name} must be (height, width) >= 16, got {size}")
        if not self.video_fps > 0:
            raise UserError(f"SynthSpec.video_fps must be positive, got {self.video_fps}")


def parse_sources(text: str) -> tuple[str, ...]:
    """`--sources` ("gta5,synthia") as a tuple; UserError for an unknown or missing name."""
    names = tuple(n.strip() for n in text.split(","))
    unknown = [n for n in names if n not in SOURCE_NAMES]
    if unknown or "gta5" not in names or len(set(names)) != len(names):
        raise UserError(
            f"--sources must list gta5 and optionally synthia, comma-separated "
            f"(known: {', '.join(SOURCE_NAMES)}), got {text!r}"
        )
    return tuple(n for n in SOURCE_NAMES if n in names)


def synthia_size(spec: SynthSpec) -> tuple[int, int]:
    """(H, W) of the SYNTHIA-layout source: the GTA5 source's width at SYNTHIA's 1280x760."""
    width = spec.source_size[1]
    return round(width * 760 / 1280), width


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(name: str, value: int, minimum: int, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{_flag(name)} must be {expected}, got {value!r}")


def spec_to_json(spec: SynthSpec) -> dict:
    """The spec as a JSON-compatible dict (tuples become lists); `sources` only when not the
    default, so a default benchmark's manifest is what it always was."""
    data = json.loads(json.dumps(asdict(spec)))
    if spec.sources == DEFAULT_SOURCES:
        del data["sources"]
    return data


# ---------------------------------------------------------------------------------------------
# Atomic file writing
# ---------------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding (fast compression) of a gray or RGB uint8 array."""
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(".png", bgr, _PNG)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def _label_palette() -> list[int]:
    """A 768-entry PIL palette: Cityscapes colours by labelId, black elsewhere."""
    pal = [0] * 768
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        pal[3 * label_id : 3 * label_id + 3] = PALETTE[train_id]
    return pal


def _palette_png_bytes(label_ids: np.ndarray) -> bytes:
    """A 'P' mode PNG of labelIds, like the real GTA5 labels."""
    img = Image.fromarray(np.ascontiguousarray(label_ids, np.uint8))
    img.putpalette(_label_palette())  # an 'L' image with a palette becomes 'P', values kept
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Jobs: one image (and label) per job, so jobs can run in worker processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """Render one image of `domain` and write it and its label."""

    seed: int
    domain: str
    index: int
    size: tuple[int, int]
    image_path: str
    label_path: str
    palette_label: bool


def _synthia_label_bytes(train_ids: np.ndarray) -> bytes:
    """SYNTHIA's GT/LABELS file: a 16-bit RGB PNG with the class id in R (instance id 0)."""
    rgb = np.zeros((*train_ids.shape, 3), np.uint16)
    rgb[:, :, 0] = TRAIN_TO_SYNTHIA_LUT[train_ids]
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1].copy(), _PNG)  # OpenCV writes BGR
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def _run_job(job: _Job) -> np.ndarray:
    """Render and write one image/label pair; returns the labelled trainId pixel counts (256,)
    (a SYNTHIA-layout label's unlabelled classes counted as 255)."""
    image, train_ids = render_image(job.seed, job.domain, job.index, *job.size)
    atomic_write(Path(job.image_path), _png_bytes(image))
    if job.domain == "synthia":
        atomic_write(Path(job.label_path), _synthia_label_bytes(train_ids))
        train_ids = np.where(np.isin(train_ids, SYNTHIA_16_CLASSES), train_ids, 255)
        return np.bincount(train_ids.reshape(-1), minlength=256).astype(np.int64)
    label_ids = train_ids_to_label_ids(train_ids)
    hood = ego_vehicle_mask(job.domain, *job.size)
    if hood is not None:  # the hood is drawn last: every pixel of it is the ego vehicle
        label_ids[hood] = EGO_VEHICLE_LABEL_ID
    data = _palette_png_bytes(label_ids) if job.palette_label else _png_bytes(label_ids)
    atomic_write(Path(job.label_path), data)
    return np.bincount(train_ids.reshape(-1), minlength=256).astype(np.int64)


def _source_jobs(out: Path, spec: SynthSpec) -> list[_Job]:
    """GTA5-layout jobs: images/00001.png and labels/00001.png (1-based like GTA5)."""
    root = out / "source"
    return [
        _Job(
            spec.seed,
            "source",
            i,
            spec.source_size,
            str(root / "images" / f"{i + 1:05d}.png"),
            str(root / "labels" / f"{i + 1:05d}.png"),
            True,
        )
        for i in range(spec.num_source)
    ]


def _synthia_jobs(out: Path, spec: SynthSpec) -> list[_Job]:
    """SYNTHIA-layout jobs: RGB/0000000.png and GT/LABELS/0000000.png (0-based, 7 digits)."""
    root = out / SYNTHIA_DIR
    return [
        _Job(
            spec.seed,
            "synthia",
            i,
            synthia_size(spec),
            str(root / "RGB" / f"{i:07d}.png"),
            str(root / "GT" / "LABELS" / f"{i:07d}.png"),
            False,
        )
        for i in range(spec.num_source)
    ]


def cityscapes_name(city: str, seq: int) -> str:
    """The Cityscapes stem `{city}_{seq:06d}_000019` of one target image."""
    return f"{city}_{seq:06d}_{CITYSCAPES_FRAME:06d}"


def _target_jobs(out: Path, spec: SynthSpec, split: str) -> list[_Job]:
    """Cityscapes-layout jobs of one split, spread over that split's cities in blocks."""
    count = spec.num_target_train if split == "train" else spec.num_target_val
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    offset = 0 if split == "train" else VAL_INDEX_OFFSET
    root = out / "target"
    jobs = []
    for j in range(count):
        city = cities[j * len(cities) // max(count, 1)]
        stem = cityscapes_name(city, j)
        jobs.append(
            _Job(
                spec.seed,
                "target",
                offset + j,
                spec.target_size,
                str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"),
                str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"),
                False,
            )
        )
    return jobs


@contextmanager
def _opencv_single_threaded() -> Iterator[None]:
    """OpenCV on one thread while images render (the bytes of the benchmark are those of one
    thread), then as it was.

    Also what makes forking safe: a child forked while the parent's OpenCV pool has threads
    (after any earlier parallel cv2 call, such as a decoded video) inherits its locks but not its
    threads and hangs for good in its own `cv2.setNumThreads`; a second demo in one process hung
    so. Going to one thread stops the parent's pool before the workers fork."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


@contextmanager
def _nothing_left_to_collect_in_workers() -> Iterator[None]:
    """The parent's garbage collected, and everything else frozen, while workers fork.

    A forked worker inherits the parent's uncollected garbage. Its own GC then ran destructors
    of objects whose threads live only in the parent. One such object was an ONNX Runtime
    session left in a reference cycle by the previous seed's stream stage: its destructor
    waited for ever in `pthread_cond_destroy`, and the third seed of `bench.synthetic` hung.
    Frozen objects are never examined by a collection, in the parent or in the workers."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_jobs(jobs: list[_Job], stage: str, workers: int, progress: Progress | None) -> np.ndarray:
    """Run jobs (in a process pool when workers > 1); returns summed trainId pixel counts."""
    total = np.zeros(256, np.int64)
    if progress:
        progress(stage, 0, len(jobs))
    results: Iterator[np.ndarray]
    with _opencv_single_threaded():
        if workers > 1 and len(jobs) > 8:
            import multiprocessing

            # fork (as torch's DataLoader does) also works from scripts without a __main__ guard
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            one_thread = {"initializer": cv2.setNumThreads, "initargs": (1,)}  # for spawn
            with (
                _nothing_left_to_collect_in_workers(),
                ProcessPoolExecutor(workers, mp_context=ctx, **one_thread) as pool,
            ):
                results = pool.map(_run_job, jobs, chunksize=8)
                for done, counts in enumerate(results, 1):
                    total += counts
                    if progress:
                        progress(stage, done, len(jobs))
            return total
        for done, job in enumerate(jobs, 1):
            total += _run_job(job)
            if progress:
                progress(stage, done, len(jobs))
    return total


# ---------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------


def video_schedule(spec: SynthSpec) -> list:
    """The default schedule stretched to the spec's frame count."""
    return scale_schedule(DEFAULT_SCHEDULE, spec.video_frames, 300)


def _write_video(out: Path, spec: SynthSpec, k: int, progress: Progress | None) -> np.ndarray:
    """Write videos/drive_{k:02d}.mp4, its trainId label PNGs and its JSON sidecar."""
    name = f"drive_{k:02d}"
    root = out / "videos"
    root.mkdir(parents=True, exist_ok=True)
    h, w = spec.target_size
    schedule = video_schedule(spec)
    tmp = root / f".{name}.tmp{os.getpid()}.mp4"
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), spec.video_fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"cv2.VideoWriter cannot write {tmp} (mp4v)")
    total = np.zeros(256, np.int64)
    stage = f"video {name}"
    try:
        for frame, (image, label) in enumerate(
            render_video(spec.seed, spec.video_frames, h, w, schedule, video=k, fps=spec.video_fps)
        ):
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            atomic_write(root / name / "labels" / f"{frame:06d}.png", _png_bytes(label))
            total += np.bincount(label.reshape(-1), minlength=256)
            if progress:
                progress(stage, frame + 1, spec.video_frames)
    finally:
        writer.release()
    os.replace(tmp, root / f"{name}.mp4")
    meta = {
        "name": name,
        "fps": spec.video_fps,
        "height": h,
        "width": w,
        "frames": spec.video_frames,
        "seed": spec.seed,
        "video_index": k,
        "schedule": [
            {"start_frame": s, "style": st, "corruption": c, "severity": v}
            for s, st, c, v in schedule
        ],
        "labels": f"{name}/labels/{{frame:06d}}.png (trainIds, 255 = ignore)",
    }
    atomic_write_json(root / f"{name}.json", meta)
    return total


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def _frequencies(counts: np.ndarray) -> dict[str, float]:
    """Per-class pixel fractions (over labelled pixels) from trainId counts."""
    valid = counts[: len(CLASS_NAMES)]
    denom = max(int(valid.sum()), 1)
    return {name: round(float(c) / denom, 6) for name, c in zip(CLASS_NAMES, valid, strict=True)}


def read_manifest(out: Path) -> dict | None:
    """The manifest of a complete benchmark under `out`, or None."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _clear(out: Path) -> None:
    """Delete what a benchmark writes under `out` (and nothing else)."""
    for name in _KNOWN_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _check_destination(out: Path, spec: SynthSpec, force: bool) -> dict | None:
    """The existing manifest when `out` already holds this benchmark; raise if it holds another."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    manifest = read_manifest(out)
    if force:
        _clear(out)
        return None
    same_renderer = manifest is not None and manifest.get("renderer", 1) == RENDERER_VERSION
    if same_renderer and manifest.get("spec") == spec_to_json(spec):
        return manifest
    if manifest is not None:
        what = "a different spec" if same_renderer else "an older renderer"
        raise FileExistsError(
            f"{out} holds a synthetic benchmark with {what} ({manifest.get('spec')}, renderer "
            f"{manifest.get('renderer', 1)}); use force=True (--force) to delete and rewrite it"
        )
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and holds no complete synthetic benchmark ({MANIFEST} missing: "
            "an interrupted write or other files); use force=True (--force) to rewrite it"
        )
    return None


def write_benchmark(
    out: Path,
    spec: SynthSpec,
    progress: Progress | None = None,
    force: bool = False,
    workers: int | None = None,
) -> dict:
    """Write the benchmark under `out` and return its manifest (fast no-op if already there).

    Raises FileExistsError when `out` holds something else, unless `force` (which deletes the
    benchmark's entries under `out` first). `workers` processes render images (default: CPUs).
    """
    from adapt_deploy import __version__

    out = Path(out)
    existing = _check_destination(out, spec, force)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    source = _run_jobs(_source_jobs(out, spec), "source", workers, progress)
    train = _run_jobs(_target_jobs(out, spec, "train"), "target train", workers, progress)
    val = _run_jobs(_target_jobs(out, spec, "val"), "target val", workers, progress)
    videos = [_write_video(out, spec, k, progress) for k in range(spec.num_videos)]
    synthia = None
    if "synthia" in spec.sources:
        synthia = _run_jobs(_synthia_jobs(out, spec), "synthia source", workers, progress)
    manifest = {
        "format": "adapt-deploy synthetic benchmark",
        "version": __version__,
        "renderer": RENDERER_VERSION,
        "spec": spec_to_json(spec),
        "counts": {
            "source": spec.num_source,
            "target_train": spec.num_target_train,
            "target_val": spec.num_target_val,
            "videos": spec.num_videos,
            "video_frames": spec.video_frames,
        },
        "layout": {
            "source": "source/images/{n:05d}.png, source/labels/{n:05d}.png (GTA5, labelIds, P)",
            "target": "target/leftImg8bit|gtFine/{split}/{city}/... (Cityscapes, labelIds)",
            "videos": "videos/drive_{k:02d}.mp4 (+ .json, labels/{frame:06d}.png trainIds)",
            "target_val_index_offset": VAL_INDEX_OFFSET,
        },
        "cities": {"train": list(TRAIN_CITIES), "val": list(VAL_CITIES)},
        "classes": list(CLASS_NAMES),
        "class_frequencies": {
            "source": _frequencies(source),
            "target_train": _frequencies(train),
            "target_val": _frequencies(val),
            "target": _frequencies(train + val),
            "videos": _frequencies(sum(videos, np.zeros(256, np.int64))),
        },
        "ignored_fraction": {
            "source": float(source[255] / max(source.sum(), 1)),
            "target": float((train + val)[255] / max((train + val).sum(), 1)),
        },
    }
    if synthia is not None:
        _add_synthia(manifest, spec, synthia)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _add_synthia(manifest: dict, spec: SynthSpec, counts: np.ndarray) -> None:
    """The SYNTHIA-layout source's entries in the manifest."""
    manifest["counts"]["synthia"] = spec.num_source
    manifest["layout"]["synthia"] = (
        f"{SYNTHIA_DIR}/RGB/{{n:07d}}.png, {SYNTHIA_DIR}/GT/LABELS/{{n:07d}}.png (SYNTHIA-RAND-"
        "CITYSCAPES, 16-bit, class id in R; its 16 classes, terrain/truck/train void)"
    )
    manifest["class_frequencies"]["synthia"] = _frequencies(counts)
    manifest["ignored_fraction"]["synthia"] = float(counts[255] / max(counts.sum(), 1))
