"""Inference latency of the deployed graph: PyTorch eager vs ONNX Runtime, CPU and GPU.

    python -m bench.inference [--models resnet18 resnet101] [--sizes 256x512 512x1024]
                              [--iters 20] [--budget 120] [--threads N] [--devices cpu cuda]
                              [--checkpoint CKPT] [--agreement-frames 4]

The model is what `adapt-deploy export` deploys (RGB uint8 frame in; labels and presence out)
around a randomly initialised full-width DeepLab-v2 (speed does not depend on the weights), or,
with --checkpoint, a trained one (then --models is that checkpoint's backbone). On CPU: PyTorch
eager, ONNX Runtime fp32 and mixed fp16, and the runtime's `Segmenter` on the torch backend in
fp32 and bf16. On a CUDA GPU, where present: the bare model in PyTorch eager fp32, bf16
autocast and a CUDA graph; the `Segmenter` on the torch backend (the runtime path: pinned
buffers, its own stream) in fp32, bf16 and fp16, each eager and replaying CUDA graphs; ONNX
Runtime CUDA (fp32, fp16; also with its CUDA graphs) and TensorRT (fp32, fp16) when installed.
The Segmenter rows wrap the same in-memory model (what `Segmenter.from_bundle(...,
backend="torch")` opens, without writing a bundle).

Backends run round-robin, one frame each in turn, so the load of a shared machine hits them
alike; ratios are taken within one run. Every row's labels are then compared with PyTorch eager
fp32 on --agreement-frames other frames ("labels vs fp32"): the goal for reduced precision is
99.5% on a trained model; with random weights the logits are near-tied everywhere and the
agreement says little. Each (device, model, size) group is kept in
bench/.work/inference/results.json, so a run can add groups; bench/results/inference.md is
rewritten from all of them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from adapt_deploy.config import InputConfig
from adapt_deploy.export.onnx_export import export_onnx, input_meta
from adapt_deploy.export.parity import target_frames
from adapt_deploy.export.precision import convert_to_mixed_fp16
from adapt_deploy.labels import CLASS_NAMES, PALETTE
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.backend import as_runner
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from adapt_deploy.runtime.torch_backend import ModelBackend
from bench.common import write_results

WORK = Path(__file__).parent / ".work" / "inference"
IMAGENET = InputConfig("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
EAGER = "PyTorch eager"  # fp32: the reference of every other row
# The runtime's torch backend: (precision, CUDA graphs) per device.
SEGMENTER_ROWS = {
    "cpu": [("fp32", False), ("bf16", False)],
    "cuda": [(p, g) for p in ("fp32", "bf16", "fp16") for g in (False, True)],
}


@dataclass
class Backend:
    """One way to run a frame: `run` returns its labels (N, H, W) once they are on the host."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]


def deploy_model(backbone: str) -> DeployModel:
    torch.manual_seed(0)
    return DeployModel(DeepLab(backbone, 19, 64, freeze_bn=True), IMAGENET, GraphSpec()).eval()


def checkpoint_model(path: Path) -> tuple[str, DeployModel]:
    """(backbone, the deployed graph) of a trained checkpoint."""
    model, config = load_checkpoint(path)
    return config.model.backbone, DeployModel(model, config.input, GraphSpec()).eval()


def segmenter_backends(model: DeployModel, device: str, frame: np.ndarray) -> list[Backend]:
    """`Segmenter` rows: the torch backend around a copy of `model` (SEGMENTER_ROWS), one frame
    in (H, W, 3), its labels out, as an application calls it."""
    _, height, width, _ = frame.shape
    meta = segmenter_meta(model, height, width)
    target = "cpu" if device == "cpu" else "cuda:0"
    rows = []
    for precision, graphs in SEGMENTER_ROWS[device]:
        deploy = DeployModel(copy.deepcopy(model.model), model.spec, model.graph)
        seg = Segmenter(ModelBackend(deploy, target, precision, graphs), meta, WORK)
        name = f"Segmenter torch {precision}" + (" CUDA graph" if graphs else " eager")
        rows.append(Backend(name, lambda x, seg=seg: seg(x[0]).labels[None]))
    return rows


def segmenter_meta(model: DeployModel, height: int, width: int) -> dict[str, Any]:
    """The meta.json fields a Segmenter reads, for `model` run at one size, batch 1."""
    count = model.model.num_classes
    cityscapes = count == len(CLASS_NAMES)
    return {
        "num_classes": count,
        "classes": list(CLASS_NAMES) if cityscapes else [f"class {i}" for i in range(count)],
        "palette": [list(c) for c in PALETTE] if cityscapes else [[128, 128, 128]] * count,
        "shapes": {"min": [1, 16, 16], "opt": [1, height, width], "max": [1, height, width]},
        "input": input_meta(model.spec, model.graph),
    }


def onnx_files(model: DeployModel, backbone: str) -> dict[str, Path]:
    """model.onnx and model_fp16.onnx of this backbone, exported once and reused."""
    directory = WORK / backbone
    files = {"fp32": directory / "model.onnx", "fp16": directory / "model_fp16.onnx"}
    if not all(f.exists() for f in files.values()):
        directory.mkdir(parents=True, exist_ok=True)
        export_onnx(model, files["fp32"])
        onnx.save(convert_to_mixed_fp16(onnx.load(str(files["fp32"]))), str(files["fp16"]))
    return files


def cpu_backends(
    model: DeployModel, files: dict[str, Path], threads: int, frame: np.ndarray
) -> list[Backend]:
    torch.set_num_threads(threads)

    @torch.inference_mode()
    def eager(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x))[0].numpy()

    backends = [Backend(EAGER, eager)]
    for precision, path in files.items():
        runner = OnnxRuntimeBackend(path, threads=threads).outputs
        backends.append(Backend(f"ONNX Runtime {precision}", lambda x, r=runner: r(x)["labels"]))
    return backends + segmenter_backends(model, "cpu", frame)


def gpu_backends(
    model: DeployModel, onnx_paths: Callable[[], dict[str, Path]], frame: np.ndarray
) -> list[Backend]:
    """PyTorch eager / bf16 / CUDA graph, ONNX Runtime CUDA, TensorRT: whatever is installed.
    ``onnx_paths`` exports the ONNX files on first call: only ONNX Runtime CUDA and TensorRT
    need them."""
    import onnxruntime as ort

    cuda = model.cuda()

    @torch.inference_mode()
    def eager(x: np.ndarray) -> np.ndarray:
        return cuda(torch.from_numpy(x).cuda())[0].cpu().numpy()

    @torch.inference_mode()
    def bf16(x: np.ndarray) -> np.ndarray:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return cuda(torch.from_numpy(x).cuda())[0].cpu().numpy()

    backends = [Backend(EAGER, eager), Backend("PyTorch bf16 autocast", bf16)]
    backends.append(Backend("PyTorch CUDA graph", _cuda_graph(cuda, frame)))
    backends += segmenter_backends(cuda, "cuda", frame)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for precision, path in onnx_paths().items():
            runner = OnnxRuntimeBackend(path, cuda_device=0).outputs
            name = f"ONNX Runtime CUDA {precision}"
            backends.append(Backend(name, lambda x, r=runner: r(x)["labels"]))
            classes = model.model.num_classes
            graphed = OnnxRuntimeBackend(path, "NHWC", classes, precision, 0, cuda_graph=True)
            run = as_runner(graphed, "NHWC")
            backends.append(Backend(f"{name} CUDA graph", lambda x, r=run: r(x)["labels"]))
    try:
        import tensorrt  # noqa: F401
    except Exception:  # not installed, or a stub wheel without its libraries
        return backends
    for precision, path in onnx_paths().items():
        backends.append(Backend(f"TensorRT {precision}", _tensorrt(path, frame, precision)))
    return backends


def _cuda_graph(model: DeployModel, frame: np.ndarray) -> Callable[[np.ndarray], object]:
    """The whole forward captured once at this frame's shape and replayed."""
    static = torch.from_numpy(frame).cuda()
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = model(static)

    def run(x: np.ndarray) -> np.ndarray:
        static.copy_(torch.from_numpy(x))
        graph.replay()
        return outputs[0].cpu().numpy()

    return run


def _tensorrt(path: Path, frame: np.ndarray, precision: str) -> Callable[[np.ndarray], object]:
    """An engine for this frame's shape; fp16 from the strongly typed mixed-precision ONNX."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        raise RuntimeError(f"TensorRT cannot parse {path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", frame.shape, frame.shape, frame.shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.set_input_shape("image", frame.shape)
    n, h, w, _ = frame.shape
    buffers = {
        "image": torch.empty(frame.shape, dtype=torch.uint8, device="cuda"),
        "labels": torch.empty((n, h, w), dtype=torch.int32, device="cuda"),
        "presence": torch.empty((n, 19), dtype=torch.float32, device="cuda"),
    }
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())

    def run(x: np.ndarray) -> np.ndarray:
        buffers["image"].copy_(torch.from_numpy(x))
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return buffers["labels"].cpu().numpy()

    return run


def time_round_robin(
    backends: list[Backend], frame: np.ndarray, iters: int, budget_s: float
) -> dict[str, list[float]]:
    """Seconds per frame of each backend; at least 3 rounds, then until iters or the budget."""
    for backend in backends:
        backend.run(frame)  # warm-up: allocations, kernel selection, graph optimizations
    times: dict[str, list[float]] = {b.name: [] for b in backends}
    start = time.perf_counter()
    for i in range(iters):
        for backend in backends:
            t0 = time.perf_counter()
            backend.run(frame)
            times[backend.name].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def label_agreement(backends: list[Backend], frames: np.ndarray) -> dict[str, float]:
    """Each backend's share of labels equal to PyTorch eager fp32's, over `frames` (N, H, W, 3)
    run one at a time."""
    reference = next(b for b in backends if b.name == EAGER)
    expected = [reference.run(frame[None]) for frame in frames]
    shares: dict[str, float] = {}
    for backend in backends:
        got = [backend.run(frame[None]) for frame in frames]
        equal = [np.mean(g == e) for g, e in zip(got, expected, strict=True)]
        shares[backend.name] = float(np.mean(equal))
    return shares


def summarize(
    times: dict[str, list[float]], agreement: dict[str, float]
) -> dict[str, dict[str, float]]:
    rows = {}
    for name, samples in times.items():
        ms = np.asarray(samples) * 1000
        rows[name] = {
            "p50_ms": float(np.median(ms)),
            "p95_ms": float(np.percentile(ms, 95)),
            "fps": 1000.0 / float(statistics.fmean(ms)),
            "n": len(samples),
            "agreement": agreement[name],
        }
    return rows


def render(groups: dict[str, dict]) -> str:
    lines = [
        "Deployed graph (RGB uint8 frame in; labels + presence out), batch 1, random weights,",
        "full-width DeepLab-v2. Backends timed round-robin within a group; `vs eager` is PyTorch",
        "eager p50 / backend p50 on the same device in the same run (> 1: faster than eager).",
        "p95 over few frames is close to the maximum. The machine is shared: absolute numbers",
        "move with its load, ratios much less. `labels vs fp32`: share of labels equal to",
        "PyTorch eager fp32's on other frames (the goal for reduced precision: 99.5% on a trained",
        "model; with random weights, near-tied logits make it say little). `Segmenter torch` rows",
        "are the runtime's torch backend, frame in, labels out.",
        "",
        "| device | model | weights | size | backend | p50 ms | p95 ms | frames/s | vs eager "
        "| labels vs fp32 | frames |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in groups.values():
        eager = group["backends"][EAGER]["p50_ms"]
        for name, row in group["backends"].items():
            agreement = row.get("agreement")
            agree = "-" if agreement is None else f"{100 * agreement:.2f}%"
            lines.append(
                f"| {group['device']} | {group['model']} | {group.get('weights', 'random')} | "
                f"{group['size']} | {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
                f"{row['fps']:.2f} | {eager / row['p50_ms']:.2f} | {agree} | {row['n']} |"
            )
    lines += ["", "Groups (when, threads, the machine's 1-minute load before -> after):", ""]
    lines += [
        f"- {key}: {g['date']}, {g['threads']}, {g.get('load', 'load not recorded')}"
        for key, g in groups.items()
    ]
    if not any(g["device"] != "cpu" for g in groups.values()):
        lines += [
            "",
            "GPU rows (PyTorch eager/bf16/CUDA graph, the Segmenter's torch backend in fp32/bf16/",
            "fp16 eager and with CUDA graphs, ONNX Runtime CUDA with and without its CUDA graphs,",
            "TensorRT) are produced by the same script on a CUDA machine; none was available for",
            "this run, so they are not measured here and those code paths are unverified.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet101"])
    parser.add_argument("--sizes", nargs="+", default=["256x512", "512x1024"])
    parser.add_argument("--iters", type=int, default=20, help="Rounds per group at most.")
    parser.add_argument("--budget", type=float, default=120.0, help="Seconds per group, roughly.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="A trained checkpoint to run instead of random weights (replaces --models).",
    )
    parser.add_argument(
        "--agreement-frames",
        type=int,
        default=4,
        help="Frames each backend's labels are compared with PyTorch eager fp32 on.",
    )
    parser.add_argument("--no-gpu", action="store_true", help="Skip the GPU groups.")
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=["cpu", "cuda"],
        help="Groups to run (cuda only where a GPU is visible).",
    )
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.no_gpu
    devices = [d for d in args.devices if d == "cpu" or gpu]

    cache = WORK / "results.json"
    groups = json.loads(cache.read_text()) if cache.exists() else {}
    if args.checkpoint is not None:
        backbone, trained = checkpoint_model(args.checkpoint)
        models = [(backbone, trained, args.checkpoint.name)]
    else:
        models = [(b, deploy_model(b), "random") for b in args.models]
    for backbone, model, weights in models:
        work = f"{backbone}_{weights}".replace(".", "_") if weights != "random" else backbone
        onnx_paths = functools.cache(lambda m=model, w=work: onnx_files(m, w))
        for size in args.sizes:
            height, width = (int(v) for v in size.split("x"))
            frame = target_frames(1, height, width)
            others = target_frames(args.agreement_frames, height, width, first=100)
            for device in devices:
                if device == "cpu":
                    backends = cpu_backends(model.cpu(), onnx_paths(), args.threads, frame)
                    threads = f"{args.threads} threads (torch and ONNX Runtime)"
                else:
                    backends = gpu_backends(model, onnx_paths, frame)
                    threads = torch.cuda.get_device_name(0)
                load = os.getloadavg()[0]
                times = time_round_robin(backends, frame, args.iters, args.budget)
                agreement = label_agreement(backends, others)
                named = "" if weights == "random" else f" {weights}"  # earlier runs' keys
                key = f"{device} {backbone}{named} {size}"
                groups[key] = {
                    "device": device,
                    "model": backbone,
                    "weights": weights,
                    "size": size,
                    "threads": threads,
                    "load": f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}",
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "backends": summarize(times, agreement),
                }
                print(key, json.dumps(groups[key]["backends"]), flush=True)
                for name, share in agreement.items():
                    print(f"  {name}: labels vs fp32 {100 * share:.3f}%", flush=True)
                cache.write_text(json.dumps(groups, indent=2))
    path = write_results("inference", "Inference: PyTorch eager vs ONNX Runtime", render(groups))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
