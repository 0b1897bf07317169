"""One contract, every runtime backend: torch, ONNX Runtime on the CPU, and TensorRT where it is
importable (with a GPU). Each case opens the shared tiny bundle through `Segmenter.from_bundle`
as a user would and holds the backend to what runtime/backend.py promises the Segmenter, verify
and the on-device sync: buffers of the graph's layout, outputs of the documented shapes and
types that match the bundle's reference samples, stable results across shapes, a public swap,
and a close that releases."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from adapt_deploy import registry
from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.errors import UserError
from adapt_deploy.export.verify import check_samples
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.backend import as_runner

BACKENDS = ["torch", "onnxruntime", pytest.param("tensorrt", marks=pytest.mark.gpu)]


def _open(name: str, bundle: Path, tmp_path: Path) -> Segmenter:
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            pytest.skip("tensorrt is not importable here (no GPU machine)")
        from adapt_deploy.export.tensorrt import build_engines

        bundle = shutil.copytree(bundle, tmp_path / "bundle")
        build_engines(bundle, fp16=False, refit=False)
        return Segmenter.from_bundle(bundle, backend="tensorrt", precision="fp32")
    return Segmenter.from_bundle(bundle, backend=name, device="cpu", precision="fp32")


@pytest.fixture(params=BACKENDS)
def segmenter(request, tiny_bundle: Path, tmp_path: Path):
    seg = _open(request.param, tiny_bundle, tmp_path)
    yield seg
    seg.close()


def test_describes_itself(segmenter: Segmenter):
    backend = segmenter.current_backend()
    assert backend.name == segmenter.backend
    assert (backend.precision, backend.device) == (segmenter.precision, segmenter.device)
    assert isinstance(backend.cuda_graph, bool) and isinstance(list(backend.notes), list)


@pytest.mark.parametrize("shape", [(1, 64, 96), (3, 32, 48)])
def test_buffers_and_outputs_have_the_documented_layout(segmenter: Segmenter, shape):
    backend, meta = segmenter.current_backend(), segmenter.meta
    buffer = backend.input_buffer(shape)
    assert buffer.shape == (*shape, 3) and buffer.dtype == np.uint8  # the tiny bundle is NHWC
    buffer[...] = np.random.default_rng(0).integers(0, 256, buffer.shape, dtype=np.uint8)
    labels, presence = backend.run(shape)
    assert labels.shape == shape and labels.dtype == np.int32
    assert presence.shape == (shape[0], meta["num_classes"]) and presence.dtype == np.float32
    assert labels.min() >= 0 and labels.max() < meta["num_classes"]
    assert np.all((presence >= 0) & (presence <= 1))


def test_matches_the_bundles_reference_samples(segmenter: Segmenter):
    run = as_runner(segmenter.current_backend(), segmenter.meta["input"]["layout"])
    report = check_samples(segmenter.bundle, segmenter.meta, "fp32", run, segmenter.backend)
    assert report.passed, [s.problems for s in report.samples]


def test_results_do_not_depend_on_the_shapes_run_before(segmenter: Segmenter):
    rng = np.random.default_rng(1)
    frames = {s: rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in [(1, 64, 96), (2, 40, 56)]}
    backend = segmenter.current_backend()

    def run(shape):
        backend.input_buffer(shape)[...] = frames[shape]
        labels, presence = backend.run(shape)
        return labels.copy(), presence.copy()

    first = run((1, 64, 96))
    run((2, 40, 56))
    again = run((1, 64, 96))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_allclose(first[1], again[1], atol=1e-6)


def test_swaps_in_a_backend_of_its_kind_and_refuses_another(
    segmenter: Segmenter, tiny_bundle: Path, tmp_path: Path
):
    frame = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    before = segmenter(frame).labels
    other = _open(segmenter.backend, segmenter.bundle, tmp_path / "other")
    replacement = other.current_backend()
    old = segmenter.swap_backend(replacement)
    assert segmenter.current_backend() is replacement
    np.testing.assert_array_equal(segmenter(frame).labels, before)  # same weights, same labels
    old.close()
    stranger = "onnxruntime" if segmenter.backend != "onnxruntime" else "torch"
    with (
        _open(stranger, tiny_bundle, tmp_path / "stranger") as wrong,
        pytest.raises(ValueError, match="swap_backend: expected a"),
    ):
        segmenter.swap_backend(wrong.current_backend())


def test_close_releases_and_later_calls_say_so(segmenter: Segmenter):
    segmenter.close()
    with pytest.raises(UserError, match="closed"):
        segmenter.current_backend()
    with pytest.raises(UserError, match="closed"):
        segmenter(np.zeros((64, 96, 3), np.uint8))


def test_every_registered_backend_is_under_contract_and_can_take_pushed_weights():
    from adapt_deploy.tta.sync import SYNCS

    names = {b if isinstance(b, str) else b.values[0] for b in BACKENDS}
    assert names == set(registry.BACKENDS.names()) == set(SYNCS)


def test_verify_and_the_sync_read_the_same_samples(tiny_bundle: Path):
    """verify's runner is the runtime's ONNX Runtime backend: it returns every graph output."""
    from adapt_deploy.export.verify import open_runner

    meta = load_meta(tiny_bundle)
    arrays = np.load(tiny_bundle / meta["samples"][0]["file"])
    outputs = open_runner(tiny_bundle, meta, "fp32", "onnxruntime")(arrays["input"])
    assert set(outputs) == {o["name"] for o in meta["outputs"]}
