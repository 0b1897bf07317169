"""Runtime: Segmenter on real ONNX Runtime sessions over real exported bundles.

`tiny_bundle` (conftest) is a ResNet-18 DeepLab at width 8, exported once per session with
shapes 1x16x16 .. 4x256x512. The TensorRT backend cannot run here (no TensorRT, no GPU): its
selection and errors are tested; the engine path itself is marked and skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import CAFFE_INPUT, open_fake_tensorrt_backend, write_checkpoint

from adapt_deploy.bundle.engine_files import EngineError, Platform, engine_path
from adapt_deploy.bundle.meta import BundleError, load_meta
from adapt_deploy.bundle.platform import TensorRTMissingError
from adapt_deploy.errors import UserError
from adapt_deploy.export.pipeline import export_bundle
from adapt_deploy.export.verify import graph_input, verify_bundle
from adapt_deploy.runtime import FrameError, Segmentation, Segmenter, colour_table, overlay
from adapt_deploy.runtime.backend import ShapeCache
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from adapt_deploy.runtime.resize import (
    fit_size,
    resize_bilinear,
    resize_bilinear_numpy,
    resize_nearest,
)
from adapt_deploy.runtime.selection import Device, choose, parse_device
from adapt_deploy.runtime.tensorrt_backend import check_in_profile

REPO = Path(__file__).resolve().parents[1]
H100 = Platform("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


def frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def reference(bundle: Path, frames: np.ndarray, precision: str = "fp32") -> dict:
    """What the bundle's ONNX model gives through verify's plain session.run."""
    name = "model.onnx" if precision == "fp32" else "model_fp16.onnx"
    return OnnxRuntimeBackend(bundle / name).outputs(
        graph_input(frames, load_meta(bundle)["input"])
    )


@pytest.fixture(scope="module")
def seg(tiny_bundle: Path):
    with Segmenter.from_bundle(tiny_bundle) as segmenter:
        yield segmenter


@pytest.fixture(scope="module")
def nchw_bundle(tmp_path_factory) -> Path:
    """float32 NCHW input (normalized by the runtime) from a BGR Caffe-style checkpoint."""
    work = tmp_path_factory.mktemp("nchw")
    checkpoint = write_checkpoint(work / "caffe.pt", CAFFE_INPUT, seed=1)
    return export_bundle(checkpoint, work / "bundle", layout="nchw").bundle


# --------------------------------------------------------------------------------------------
# Importing, choosing a backend
# --------------------------------------------------------------------------------------------


def test_runtime_imports_and_runs_without_torch_or_opencv(tiny_bundle: Path):
    code = (
        "import sys, numpy as np\n"
        "from adapt_deploy.runtime import Segmenter, Segmentation\n"
        "import adapt_deploy.runtime.selection, adapt_deploy.runtime.tensorrt_backend\n"
        "import adapt_deploy.runtime.cuda_memory, adapt_deploy.runtime.torch_backend\n"
        "assert not {'torch', 'cv2', 'tensorrt'} & set(sys.modules), sys.modules.keys()\n"
        f"seg = Segmenter.from_bundle({str(tiny_bundle)!r})\n"
        "out = seg(np.zeros((40, 60, 3), np.uint8))\n"
        "assert out.labels.shape == (40, 60)\n"
        "assert not {'torch', 'cv2'} & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_auto_on_a_cpu_machine_is_onnxruntime_fp32(seg: Segmenter, tiny_bundle: Path):
    assert (seg.backend, seg.precision, seg.device) == ("onnxruntime", "fp32", "cpu")
    meta = load_meta(tiny_bundle)
    assert seg.classes == meta["classes"] and seg.palette.shape == (19, 3)
    assert seg.palette.dtype == np.uint8 and seg.max_batch == 4
    assert "onnxruntime" in repr(seg)


NO_ENGINE = EngineError("no fp16 TensorRT engine")
ENGINES = {"fp16": None, "fp32": None}
FP32_ONLY = {"fp16": NO_ENGINE, "fp32": None}
FP16_ONLY = {"fp16": None, "fp32": NO_ENGINE}
NONE = {"fp16": NO_ENGINE, "fp32": NO_ENGINE}
CASES = [
    # backend, precision, device, engines, ort_cuda -> backend, precision, cuda
    ("auto", "auto", Device(0), ENGINES, True, ("tensorrt", "fp16", 0)),
    ("auto", "auto", Device(1), FP32_ONLY, True, ("tensorrt", "fp32", 1)),
    ("auto", "fp32", Device(0), FP16_ONLY, True, ("onnxruntime", "fp32", 0)),
    ("auto", "auto", Device(0), NONE, True, ("onnxruntime", "fp16", 0)),
    ("auto", "auto", Device(0), {}, False, ("onnxruntime", "fp32", None)),
    ("auto", "auto", Device(None), ENGINES, True, ("onnxruntime", "fp32", None)),
    ("onnxruntime", "auto", Device(0), ENGINES, True, ("onnxruntime", "fp16", 0)),
    ("onnxruntime", "fp16", Device(None), {}, False, ("onnxruntime", "fp16", None)),
    ("tensorrt", "fp32", Device(0), ENGINES, False, ("tensorrt", "fp32", 0)),
    ("torch", "auto", Device(0), {}, False, ("torch", "fp32", None)),
]  # fmt: skip


@pytest.mark.parametrize(("backend", "precision", "device", "engines", "ort_cuda", "want"), CASES)
def test_selection_rule(backend, precision, device, engines, ort_cuda, want):
    choice = choose(backend, precision, device, ["fp32", "fp16"], engines, ort_cuda)
    assert (choice.backend, choice.precision, choice.cuda) == want


def test_selection_errors_say_what_is_missing():
    missing = TensorRTMissingError("TensorRT is not installed")
    with pytest.raises(TensorRTMissingError):
        choose("tensorrt", "auto", Device(0), ["fp32"], dict.fromkeys(ENGINES, missing), True)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        choose("tensorrt", "auto", Device(None), ["fp32"], {}, False)
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        choose("onnxruntime", "auto", Device(0, required=True), ["fp32"], {}, False)
    with pytest.raises(UserError, match="fp16 on a CUDA GPU only"):
        choose("torch", "fp16", Device(None), ["fp32"], {}, False)
    with pytest.raises(UserError, match="backend: expected one of"):
        choose("openvino", "auto", Device(None), ["fp32"], {}, False)
    with pytest.raises(UserError, match="precision: expected one of"):
        choose("auto", "int8", Device(None), ["fp32"], {}, False)


def test_parse_device():
    assert parse_device(0) == Device(0) and parse_device(2) == Device(2)
    assert parse_device("cpu") == Device(None)
    assert parse_device("cuda") == Device(0, True) and parse_device("cuda:1") == Device(1, True)
    for bad in (-1, "gpu", True, 1.5):
        with pytest.raises(UserError, match="device: expected"):
            parse_device(bad)


def test_parse_device_reads_an_index_given_as_text():
    """As the CLI, the ROS parameter and the example pass it: the same as the int."""
    assert parse_device("0") == Device(0) == parse_device(0)
    assert parse_device(" 1 ") == Device(1)
    for bad in ("-1", "1.5", "", "0x1", "١"):  # the last: ARABIC-INDIC DIGIT ONE
        with pytest.raises(UserError, match=r"^--device: expected"):
            parse_device(bad, "--device")


class FakeMemory:
    """Records what the TensorRT backend does with its CUDA memory."""

    def __init__(self, device: int) -> None:
        self.allocated, self.closed, self.active = 0, False, False
        self.stream = 1

    def activate(self) -> None:
        self.active = True

    def device(self, nbytes: int) -> int:
        self.allocated += 1
        return 4096 * self.allocated

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    num_io_tensors = 3

    def create_execution_context(self):
        return self

    def set_input_shape(self, name, shape) -> bool:
        return True

    def get_tensor_name(self, i: int) -> str:
        return ["input", "labels", "other"][i]  # no "presence": _allocate fails after mallocs

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return (1, 8, 8)

    def set_tensor_address(self, name, address) -> bool:
        return True


@pytest.mark.parametrize(("engine", "message"), [(None, "deserialize"), (FakeEngine(), "no tens")])
def test_tensorrt_backend_frees_its_cuda_memory_when_it_fails_to_open(monkeypatch, engine, message):
    memories: list[FakeMemory] = []

    def memory(device: int) -> FakeMemory:
        memories.append(FakeMemory(device))
        return memories[-1]

    with pytest.raises(EngineError, match=message):
        open_fake_tensorrt_backend(monkeypatch, engine, memory, "input", [1, 8, 8], device=1)
    assert len(memories) == 1 and memories[0].active and memories[0].closed
    assert memories[0].allocated == (0 if engine is None else 3)  # freed by close()


def test_cuda_errors_are_named_as_text():
    from types import SimpleNamespace

    from adapt_deploy.runtime.cuda_memory import CudaPythonMemory, error_name

    errors = SimpleNamespace(cudaSuccess=0)
    cudart = SimpleNamespace(
        cudaError_t=errors,
        cudaGetErrorName=lambda err: (0, b"cudaErrorInvalidDevice"),
        cudaSetDevice=lambda device: (101,),
    )
    assert error_name(cudart, 101) == "cudaErrorInvalidDevice"
    with pytest.raises(RuntimeError, match=r"device 7: cudaErrorInvalidDevice$"):
        CudaPythonMemory(cudart, 7)


def test_tensorrt_requested_or_present_without_tensorrt(tiny_bundle: Path, tmp_path: Path):
    if shutil.which("nvidia-smi") or _importable("tensorrt"):
        pytest.skip("this machine may have TensorRT or a GPU")
    with pytest.raises(TensorRTMissingError, match="pip install"):
        Segmenter.from_bundle(tiny_bundle, backend="tensorrt")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        Segmenter.from_bundle(tiny_bundle, backend="tensorrt", device="cpu")
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        Segmenter.from_bundle(tiny_bundle, device="cuda:0")
    # an engine in the bundle without TensorRT here: auto falls back and says why
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    engine_path(copy, "fp16", H100).parent.mkdir()
    engine_path(copy, "fp16", H100).write_bytes(b"plan")
    with Segmenter.from_bundle(copy) as seg:
        assert seg.backend == "onnxruntime"
        assert any("TensorRT is not installed" in note for note in seg.notes)
    with pytest.raises(TensorRTMissingError):
        verify_bundle(copy, backend="tensorrt")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def test_engine_profile_check():
    profile = {"min": [1, 16, 16, 3], "opt": [1, 64, 96, 3], "max": [4, 256, 512, 3]}
    check_in_profile((4, 256, 512, 3), profile, "x.plan")
    with pytest.raises(EngineError, match="outside the engine's profile"):
        check_in_profile((1, 300, 96, 3), profile, "x.plan")


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime(tiny_bundle: Path, tmp_path: Path):
    if not _importable("tensorrt"):
        pytest.skip("tensorrt not importable")
    from adapt_deploy.export.tensorrt import build_engines

    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    build_engines(copy, fp16=False, refit=False)
    frames = np.stack([frame(64, 96, seed) for seed in range(3)])
    with Segmenter.from_bundle(copy, backend="tensorrt", precision="fp32") as seg:
        labels = np.stack([r.labels for r in seg.batch(list(frames))])
    assert np.mean(labels == reference(copy, frames)["labels"]) > 0.999


# --------------------------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------------------------


def test_frames_in_range_match_the_onnx_model(seg: Segmenter, tiny_bundle: Path):
    image = frame(64, 96)
    result = seg(image)
    expected = reference(tiny_bundle, image[None])
    assert isinstance(result, Segmentation)
    assert result.labels.dtype == np.uint8 and result.labels.shape == (64, 96)
    np.testing.assert_array_equal(result.labels, expected["labels"][0])
    assert result.presence.dtype == np.float32 and result.presence.shape == (19,)
    np.testing.assert_allclose(result.presence, expected["presence"][0], atol=1e-6)
    assert set(result.timings) == {"preprocess", "infer", "postprocess", "total"}
    assert result.timings["total"] == pytest.approx(
        sum(result.timings[k] for k in ("preprocess", "infer", "postprocess"))
    )


def test_frames_outside_the_range_are_resized_and_labels_mapped_back(seg, tiny_bundle):
    image = frame(300, 700, seed=1)  # max is 256x512: runs at 219x512
    assert seg.inference_size(300, 700) == (219, 512)
    small = resize_bilinear(image, 219, 512)
    expected = reference(tiny_bundle, small[None])["labels"][0].astype(np.uint8)
    result = seg(image)
    assert result.labels.shape == (300, 700)
    np.testing.assert_array_equal(result.labels, resize_nearest(expected, 300, 700))
    assert seg(frame(8, 12)).labels.shape == (8, 12)  # below the minimum: upscaled


def test_grey_and_rgba_frames_are_converted(seg: Segmenter):
    rgb = frame(48, 80, seed=2)
    grey = rgb[:, :, 1]
    as_rgb = seg(np.repeat(grey[:, :, None], 3, axis=2)).labels
    np.testing.assert_array_equal(seg(grey).labels, as_rgb)
    np.testing.assert_array_equal(seg(grey[:, :, None]).labels, as_rgb)
    rgba = np.dstack([rgb, np.full((48, 80), 7, np.uint8)])
    np.testing.assert_array_equal(seg(rgba).labels, seg(rgb).labels)
    np.testing.assert_array_equal(seg(rgb[:, ::-1]).labels, seg(rgb[:, ::-1].copy()).labels)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), "expected dtype uint8"),
        (np.zeros((32, 32, 2), np.uint8), r"got shape \(32, 32, 2\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), "got shape"),
        (np.zeros((0, 32, 3), np.uint8), "empty frame"),
        ([[0, 1], [2, 3]], "expected a numpy array"),
    ],
)
def test_wrong_frames_are_clear_errors(seg: Segmenter, bad, message):
    with pytest.raises(FrameError, match=message) as info:
        seg(bad)
    assert isinstance(info.value, UserError) and str(info.value).startswith("frame:")


def test_batch_equals_single_calls_across_sizes_and_chunks(seg: Segmenter):
    frames = [frame(64, 96, s) for s in range(5)] + [frame(40, 50, 9), frame(300, 600, 8)]
    results = seg.batch(frames)  # 5 same-size frames: two calls (max batch 4)
    assert len(results) == len(frames)
    for image, result in zip(frames, results, strict=True):
        single = seg(image)
        assert result.labels.shape == image.shape[:2]
        np.testing.assert_array_equal(result.labels, single.labels)
        np.testing.assert_allclose(result.presence, single.presence, atol=1e-5)
    assert seg.batch(np.stack(frames[:2]))[1].labels.shape == (64, 96)
    with pytest.raises(FrameError, match=r"frames\[1\]"):
        seg.batch([frames[0], frames[0].astype(np.int16)])


def test_fixed_inference_size(tiny_bundle: Path, seg: Segmenter):
    with Segmenter.from_bundle(tiny_bundle, size=(64, 96)) as fixed:
        image = frame(128, 192, seed=3)
        result = fixed(image)
        assert result.labels.shape == (128, 192)
        expected = reference(tiny_bundle, resize_bilinear(image, 64, 96)[None])["labels"][0]
        np.testing.assert_array_equal(result.labels[::2, ::2], expected)
    with pytest.raises(UserError, match=r"size: expected \(H, W\) within"):
        Segmenter.from_bundle(tiny_bundle, size=(1000, 96))


def test_fp16_on_cpu_and_missing_precisions(tiny_bundle: Path, nchw_bundle: Path):
    image = frame(64, 96, seed=4)
    with Segmenter.from_bundle(tiny_bundle, precision="fp16", threads=1) as half:
        assert half.precision == "fp16"
        expected = reference(tiny_bundle, image[None], "fp16")["labels"][0]
        np.testing.assert_array_equal(half(image).labels, expected)
    with pytest.raises(BundleError, match="no 'fp16' model in this bundle"):
        Segmenter.from_bundle(nchw_bundle, precision="fp16")


def test_nchw_bundles_are_normalized_by_the_runtime(nchw_bundle: Path):
    image = frame(72, 100, seed=5)
    with Segmenter.from_bundle(nchw_bundle) as seg:
        result = seg(image)
    expected = reference(nchw_bundle, image[None])
    np.testing.assert_array_equal(result.labels, expected["labels"][0])
    np.testing.assert_allclose(result.presence, expected["presence"][0], atol=1e-6)


def test_torch_backend_runs_the_checkpoint_beside_the_bundle(tiny_bundle: Path, tmp_path: Path):
    image = frame(64, 96, seed=6)
    with Segmenter.from_bundle(tiny_bundle, backend="torch", device="cpu") as seg:
        assert (seg.backend, seg.precision) == ("torch", "fp32")
        result = seg(image)
    expected = reference(tiny_bundle, image[None])
    assert np.mean(result.labels == expected["labels"][0]) > 0.999
    np.testing.assert_allclose(result.presence, expected["presence"][0], atol=1e-4)
    alone = shutil.copytree(tiny_bundle, tmp_path / "alone")
    with pytest.raises(UserError, match=r"source checkpoint tiny\.pt, which is not in"):
        Segmenter.from_bundle(alone, backend="torch")
    (tmp_path / "tiny.pt").write_bytes(b"another checkpoint")
    with pytest.raises(UserError, match="is not the checkpoint this bundle was exported from"):
        Segmenter.from_bundle(alone, backend="torch")


def test_a_changed_model_is_refused(tiny_bundle: Path, tmp_path: Path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"does not match meta\.json"):
        Segmenter.from_bundle(copy)


def test_buffers_are_allocated_once_per_shape(tiny_bundle: Path):
    backend = OnnxRuntimeBackend(tiny_bundle / "model.onnx", "NHWC", 19, "fp32")
    buffer = backend.input_buffer((1, 64, 96))
    buffer[...] = frame(64, 96)
    labels, presence = backend.run((1, 64, 96))
    assert backend.input_buffer((1, 64, 96)) is buffer
    again = backend.run((1, 64, 96))
    assert again[0] is labels and again[1] is presence
    made = []
    cache = ShapeCache(lambda shape: made.append(shape) or shape, size=2)
    for shape in [(1, 2, 3), (1, 2, 3), (1, 4, 5), (1, 6, 7), (1, 2, 3)]:
        cache.get(shape)
    assert made == [(1, 2, 3), (1, 4, 5), (1, 6, 7), (1, 2, 3)]


def test_threads_share_one_segmenter_safely(seg: Segmenter):
    frames = [frame(64, 96, s) for s in range(4)] + [frame(50, 70, s) for s in range(4)]
    expected = [seg(f).labels for f in frames]
    got: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(3):
            got[index] = seg(frames[index]).labels

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(frames))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, labels in enumerate(expected):
        np.testing.assert_array_equal(got[i], labels)


def test_closed_segmenter_refuses_calls(tiny_bundle: Path):
    seg = Segmenter.from_bundle(tiny_bundle)
    seg.close()
    seg.close()  # twice is fine
    with pytest.raises(UserError, match="closed"):
        seg(frame(32, 32))


# --------------------------------------------------------------------------------------------
# Resizing and colours
# --------------------------------------------------------------------------------------------


def test_fit_size_keeps_in_range_sizes_and_the_aspect_ratio():
    low, high = (16, 16), (256, 512)
    assert fit_size(64, 96, low, high) == (64, 96)
    assert fit_size(1080, 1920, low, high) == (256, 455)
    assert fit_size(8, 12, low, high) == (16, 24)
    assert fit_size(10, 2000, low, high) == (16, 512)  # the range wins over the aspect ratio


def test_numpy_resize_matches_opencv_and_labels_map_back():
    cv2 = pytest.importorskip("cv2")
    image = frame(61, 97, seed=7)
    for size in [(30, 40), (130, 201), (61, 97)]:
        ours = resize_bilinear_numpy(image, *size).astype(int)
        theirs = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.abs(ours - theirs).max() <= 1
    grey = resize_bilinear_numpy(image[:, :, 0], 30, 40)
    assert grey.shape == (30, 40)
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(resize_nearest(labels, 6, 8), labels.repeat(2, 0).repeat(2, 1))


def test_overlay_blends_class_colours():
    table = colour_table([[255, 0, 0], [0, 0, 255]])
    labels = np.array([[0, 1]], np.uint8)
    image = np.full((1, 2, 3), 100, np.uint8)
    np.testing.assert_array_equal(
        overlay(image, labels, table, 0.5), [[[178, 50, 50], [50, 50, 178]]]
    )
    assert overlay(image[:, :, 0], labels, table, 0.0).tolist() == image.tolist()
    assert table[200].tolist() == [0, 0, 0]


def test_overlay_through_opencv_matches_numpy(monkeypatch):
    pytest.importorskip("cv2")
    from adapt_deploy.runtime import colors

    rng = np.random.default_rng(5)
    image, labels = frame(30, 40, seed=5), rng.integers(0, 19, (30, 40), np.uint8)
    table = colour_table(rng.integers(0, 256, (19, 3)))
    fast = [overlay(x, labels, table, 0.3) for x in (image, image[:, :, 1], image[:, ::-1])]
    monkeypatch.setattr(colors, "_opencv", lambda: None)
    slow = [overlay(x, labels, table, 0.3) for x in (image, image[:, :, 1], image[:, ::-1])]
    for a, b in zip(fast, slow, strict=True):
        assert a.shape == b.shape == (30, 40, 3) and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b).max() <= 1


def test_perception_loop_example_runs_on_an_image_folder(tiny_bundle: Path, tmp_path: Path):
    cv2 = pytest.importorskip("cv2")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "frames" / f"{i}.png"), frame(120, 200 + 40 * i, seed=i))
    command = [sys.executable, str(REPO / "examples" / "perception_loop.py"), str(tiny_bundle)]
    command += [str(tmp_path / "frames"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "frame 2:" in result.stdout and "3 frames" in result.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["000000.png", "000001.png", "000002.png"]
    assert cv2.imread(str(tmp_path / "out" / "000002.png")).shape == (120, 280, 3)


def test_perception_loop_example_reads_sources_as_the_stream_does(tiny_bundle, tmp_path):
    """Natural order (2 before 10), an unreadable image skipped, a wrong bundle in one line."""
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, width in ((1, 160), (2, 200), (10, 240)):
        cv2.imwrite(str(folder / f"{i}.png"), frame(120, width, seed=i))
    (folder / "5.png").write_bytes(b"not a png")
    example = [sys.executable, str(REPO / "examples" / "perception_loop.py")]
    command = [*example, str(tiny_bundle), str(folder), "--out", str(tmp_path / "out")]
    result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 frames" in result.stdout
    widths = {p.name: cv2.imread(str(p)).shape[1] for p in (tmp_path / "out").iterdir()}
    assert widths == {"000000.png": 160, "000001.png": 200, "000003.png": 240}
    missing = subprocess.run([*example, str(tmp_path / "nowhere"), str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "nowhere" in missing.stderr
