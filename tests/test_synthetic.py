"""Fast tests of the synthetic benchmark: scenes, styles, corruptions, videos and the writer."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from adapt_deploy.data.corruptions import CORRUPTIONS, apply_corruption
from adapt_deploy.data.synthetic import (
    ABSENT_CLASSES,
    STYLES,
    class_presence,
    render_image,
    render_video,
)
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX, label_ids_to_train_ids

H, W = 128, 256
N = 20


@pytest.fixture(scope="module")
def renders() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """20 small images per domain, rendered once for the module."""
    return {d: [render_image(3, d, i, H, W) for i in range(N)] for d in STYLES}


def test_render_is_deterministic() -> None:
    for domain in STYLES:
        a_img, a_lab = render_image(7, domain, 5, H, W)
        b_img, b_lab = render_image(7, domain, 5, H, W)
        assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
        assert a_img.shape == (H, W, 3) and a_img.dtype == np.uint8
        assert a_lab.shape == (H, W) and a_lab.dtype == np.uint8
        assert not np.array_equal(a_img, render_image(8, domain, 5, H, W)[0])
        assert not np.array_equal(a_img, render_image(7, domain, 6, H, W)[0])


def test_unknown_domain_raises() -> None:
    with pytest.raises(ValueError, match="source"):
        render_image(0, "gta", 0, H, W)


def test_labels_valid_and_varied(renders) -> None:
    valid = set(range(len(CLASS_NAMES))) - set(ABSENT_CLASSES) | {IGNORE_INDEX}
    for domain, items in renders.items():
        presence = np.array([class_presence(lab) for _, lab in items])
        for _, lab in items:
            assert set(np.unique(lab).tolist()) <= valid
        assert presence.any(axis=0).sum() >= 10, domain
        assert not presence[:, list(ABSENT_CLASSES)].any()
        # class presence varies: several classes are present in some images and not in others
        varying = (presence.any(axis=0) & ~presence.all(axis=0)).sum()
        assert varying >= 6, domain
        assert len({p.tobytes() for p in presence}) >= N // 2


def test_target_has_ego_hood(renders) -> None:
    for _, lab in renders["target"]:
        assert (lab[-2] == IGNORE_INDEX).mean() > 0.5
    for _, lab in renders["source"]:
        assert (lab[-2] == IGNORE_INDEX).mean() < 0.5


def _class_means(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, np.ndarray]:
    """Mean RGB colour per class over a set of images."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for img, lab in items:
        for c in np.unique(lab):
            if c == IGNORE_INDEX:
                continue
            m = lab == c
            sums[int(c)] = sums.get(int(c), 0) + img[m].astype(np.float64).sum(0)
            counts[int(c)] = counts.get(int(c), 0) + int(m.sum())
    return {c: sums[c] / counts[c] for c in sums}


def test_target_shift_is_global_plus_class_level(renders) -> None:
    """Every class changes colour; the classes that change appearance outright change most."""
    src, tgt = _class_means(renders["source"]), _class_means(renders["target"])
    common = sorted(set(src) & set(tgt))
    assert len(common) >= 8
    dist = {CLASS_NAMES[c]: float(np.linalg.norm(src[c] - tgt[c])) for c in common}
    assert all(d > 15 for d in dist.values()), dist
    toned = ("road", "sidewalk", "building", "wall", "fence", "pole", "vegetation", "terrain")
    outright = ("traffic light", "traffic sign", "person", "rider", "bicycle")
    toned_d = [dist[n] for n in toned if n in dist]
    outright_d = [dist[n] for n in outright if n in dist]
    assert len(toned_d) >= 5 and len(outright_d) >= 3, dist
    assert min(outright_d) > max(toned_d), dist


def test_corruptions() -> None:
    img, _ = render_image(0, "target", 1, H, W)
    for kind in CORRUPTIONS:
        diffs = []
        for severity in range(1, 6):
            out = apply_corruption(img, kind, severity, np.random.default_rng(0))
            assert out.shape == img.shape and out.dtype == np.uint8
            diffs.append(float(np.abs(out.astype(np.int16) - img).mean()))
        assert all(a < b for a, b in pairwise(diffs)), (kind, diffs)
    with pytest.raises(ValueError, match="fog"):
        apply_corruption(img, "hail", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
        apply_corruption(img, "fog", 6, np.random.default_rng(0))


def test_video_is_coherent_and_deterministic() -> None:
    schedule = [(0, "target", None, 0), (4, "target", "fog", 3), (6, "source", None, 0)]
    a = list(render_video(1, 8, H, W, schedule))
    b = list(render_video(1, 8, H, W, schedule))
    assert len(a) == 8
    assert all(x[0].tobytes() == y[0].tobytes() for x, y in zip(a, b, strict=True))
    # consecutive clear frames are similar (the camera moves a little), far frames less so
    lab = [x[1] for x in a]
    assert (lab[0] == lab[1]).mean() > 0.6
    assert (lab[0] != lab[1]).any()
    assert (a[3][1][-2] == IGNORE_INDEX).mean() > 0.5  # target hood
    assert (a[7][1][-2] == IGNORE_INDEX).mean() < 0.5  # source: no hood


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_writer_layouts_and_rewrites(tmp_path: Path) -> None:
    spec = SynthSpec(
        seed=1,
        num_source=2,
        num_target_train=3,
        num_target_val=1,
        source_size=(72, 128),
        target_size=(64, 128),
        num_videos=1,
        video_frames=6,
        video_fps=5.0,
    )
    stages: list[str] = []
    manifest = write_benchmark(tmp_path, spec, lambda s, d, t: stages.append(s), workers=1)
    files = _files(tmp_path)
    expected = {
        "synth.json",
        "source/images/00001.png",
        "source/images/00002.png",
        "source/labels/00001.png",
        "source/labels/00002.png",
        "videos/drive_00.mp4",
        "videos/drive_00.json",
        *(f"videos/drive_00/labels/{f:06d}.png" for f in range(6)),
    }
    for split, city, seq in [
        ("train", "synthaachen", 0),
        ("train", "synthbremen", 2),
        ("val", "synthfrankfurt", 0),
    ]:
        stem = f"{city}_{seq:06d}_000019"
        expected.add(f"target/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
        expected.add(f"target/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png")
    assert expected <= files
    assert len([f for f in files if f.startswith("target/leftImg8bit")]) == 4
    assert not [f for f in files if ".tmp" in f]
    assert {"source", "target train", "target val"} <= set(stages)

    gta_label = Image.open(tmp_path / "source/labels/00001.png")
    assert gta_label.mode == "P"
    ids = np.array(gta_label)
    _, train_ids = render_image(1, "source", 0, 72, 128)
    assert np.array_equal(label_ids_to_train_ids(ids), train_ids)
    assert 7 in np.unique(ids)  # road labelId

    cs = tmp_path / "target/gtFine/train/synthaachen/synthaachen_000000_000019_gtFine_labelIds.png"
    cs_ids = cv2.imread(str(cs), cv2.IMREAD_UNCHANGED)
    assert cs_ids.ndim == 2 and cs_ids.dtype == np.uint8
    _, train_ids = render_image(1, "target", 0, 64, 128)
    assert (cs_ids[train_ids == 0] == 7).all() and (train_ids == 0).any()

    cap = cv2.VideoCapture(str(tmp_path / "videos/drive_00.mp4"))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    cap.release()
    meta = json.loads((tmp_path / "videos/drive_00.json").read_text())
    assert meta["frames"] == 6 and meta["fps"] == 5.0

    assert manifest["spec"]["num_source"] == 2 and "version" in manifest
    assert json.loads((tmp_path / "synth.json").read_text()) == manifest

    # same spec: no-op; different spec: refuse; force: rewrite
    before = (tmp_path / "source/images/00001.png").stat().st_mtime_ns
    assert write_benchmark(tmp_path, spec, workers=1) == manifest
    assert (tmp_path / "source/images/00001.png").stat().st_mtime_ns == before
    older = {**manifest, "renderer": 1}  # written by an older renderer: never reused silently
    (tmp_path / "synth.json").write_text(json.dumps(older))
    with pytest.raises(FileExistsError, match=r"older renderer.*force"):
        write_benchmark(tmp_path, spec, workers=1)
    (tmp_path / "synth.json").write_text(json.dumps(manifest))
    other = SynthSpec(**{**spec.__dict__, "seed": 2, "num_videos": 0, "num_source": 1})
    with pytest.raises(FileExistsError, match="force"):
        write_benchmark(tmp_path, other, workers=1)
    rewritten = write_benchmark(tmp_path, other, force=True, workers=1)
    assert rewritten["spec"]["seed"] == 2
    assert not (tmp_path / "videos").exists()
    assert not (tmp_path / "source/images/00002.png").exists()


def test_writer_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_benchmark(
            tmp_path,
            SynthSpec(num_source=1, num_target_train=0, num_target_val=0, num_videos=0),
            workers=1,
        )


FORK_AFTER_OPENCV = """
import sys
from pathlib import Path
import cv2, numpy as np
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
image = np.random.default_rng(0).random((1500, 1500, 3), dtype=np.float32)
for _ in range(3):
    cv2.GaussianBlur(image, (31, 31), 0)  # OpenCV's thread pool now has threads
threads = cv2.getNumThreads()
spec = SynthSpec(num_source=24, num_target_train=4, num_target_val=2, num_videos=0,
                 source_size=(36, 64), target_size=(32, 64))
write_benchmark(Path(sys.argv[1]), spec, workers=2)
assert cv2.getNumThreads() == threads, "the writer changed OpenCV's thread count"
"""


FORK_AFTER_ONNXRUNTIME_GARBAGE = """
import gc, os, sys, time
from pathlib import Path
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64])
graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
options = ort.SessionOptions()
options.intra_op_num_threads = 2

class Holder:  # a session in a reference cycle: garbage only the cyclic GC frees
    def __init__(self):
        cpu = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=cpu)
        self.me = self
gc.disable()  # the parent leaves its garbage to the cyclic GC, which has not run yet
holder = Holder()
for _ in range(20):
    holder.session.run(None, {"x": np.ones((1, 64, 64), np.float32)})  # its pool has threads
del holder
time.sleep(0.5)  # the pool's threads stop spinning and wait
os.register_at_fork(after_in_child=gc.collect)  # a worker collects what it inherited
spec = SynthSpec(num_source=24, num_target_train=4, num_target_val=2, num_videos=0,
                 source_size=(36, 64), target_size=(32, 64))
write_benchmark(Path(sys.argv[1]), spec, workers=2)
print("done")
"""


@pytest.mark.parametrize(
    "scenario", ["opencv_threads", "onnxruntime_garbage"], ids=["opencv", "onnxruntime"]
)
def test_writer_forks_workers_safely_after_threads_ran(tmp_path: Path, scenario: str) -> None:
    """Writing the benchmark after threaded work in the same process hung for good in forked
    workers: after a parallel cv2 call (a second demo in one process: the workers inherited
    OpenCV's pool locks), and with an ONNX Runtime session left as garbage in a reference cycle
    (the third seed of bench.synthetic: a worker's GC ran its destructor, which waits for the
    parent's threads). The second script disables the parent's GC and makes each worker collect
    at once, so the old writer hangs every time."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "fork_after_threads.py"
    scripts = {
        "opencv_threads": FORK_AFTER_OPENCV,
        "onnxruntime_garbage": FORK_AFTER_ONNXRUNTIME_GARBAGE,
    }
    script.write_text(scripts[scenario])
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "bench")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung workers too
        process.communicate()
        pytest.fail(f"writing the benchmark hung ({scenario})")
    assert process.returncode == 0, stderr
    assert len(list((tmp_path / "bench" / "source" / "images").glob("*.png"))) == 24
