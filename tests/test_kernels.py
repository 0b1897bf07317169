"""The fused CUDA kernels' Python side on a CPU machine: choice, log line, errors, build, CI check.

The kernels themselves run in tests/test_cuda_emulation.py (CPU emulation) and, on a GPU, in
bench/kernels.py; what needs a CUDA build of torch is not reachable here.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapt_deploy import doctor
from adapt_deploy.cli import app
from adapt_deploy.errors import UserError
from adapt_deploy.ops import (
    attention_pool,
    attention_pool_reference,
    cuda_build,
    cuda_impl,
    kernel_choice,
    kernel_status,
    kernels,
    lse_pool,
    lse_pool_reference,
)
from adapt_deploy.ops import compile_check as check

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "adapt_deploy.ops"
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA support")


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch: pytest.MonkeyPatch):
    """Each test chooses again from its own environment, and leaves no choice behind."""
    monkeypatch.delenv(kernels.MODE_ENV, raising=False)
    kernels.reset()
    yield
    kernels.reset()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return 3 * torch.randn(2, 3, 5, 6, generator=gen), torch.randn(2, 4, 5, 6, generator=gen)


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


# ------------------------------------------------------------------------- the choice


def test_off_uses_the_reference_and_says_so_once(monkeypatch, caplog) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, "off")
    caplog.set_level(logging.INFO, logger=LOGGER)
    logits, features = _inputs()
    torch.testing.assert_close(lse_pool(logits, 1.5), lse_pool_reference(logits, 1.5))
    torch.testing.assert_close(
        attention_pool(logits, features), attention_pool_reference(logits, features)
    )
    (record,) = _records(caplog)
    assert "PyTorch reference (ADAPT_DEPLOY_KERNELS=off)" in record.getMessage()
    assert kernel_status() == kernels.KernelStatus("off", False, "ADAPT_DEPLOY_KERNELS=off")


@cpu_torch
def test_auto_without_cuda_uses_the_reference_in_one_log_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    logits, features = _inputs()
    for _ in range(3):
        torch.testing.assert_close(lse_pool(logits), lse_pool_reference(logits))
        attention_pool(logits, features)
    (record,) = _records(caplog)
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "PyTorch reference" in message and "no CUDA" in message and torch.__version__ in message
    status = kernel_status()
    assert (status.mode, status.active, status.degraded) == ("auto", False, False)


@cpu_torch
def test_require_without_cuda_is_a_user_error_that_says_why(monkeypatch) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, "require")
    logits, features = _inputs()
    expected = r"ADAPT_DEPLOY_KERNELS=require, but .*no CUDA: torch .* CPU-only build"
    with pytest.raises(UserError, match=expected):
        lse_pool(logits)
    with pytest.raises(UserError, match=expected):  # and on every later call
        attention_pool(logits, features)
    with pytest.raises(UserError, match=expected):
        kernel_status()


def test_an_unknown_mode_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, "fast")
    with pytest.raises(UserError, match=r"ADAPT_DEPLOY_KERNELS='fast': expected one of auto"):
        lse_pool(_inputs()[0])


def test_the_mode_is_read_case_insensitively(monkeypatch) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, " OFF ")
    assert kernels.read_mode() == "off"


def test_importing_the_ops_chooses_nothing_until_an_op_runs(caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert not kernels._CHOICE.made and not _records(caplog)
    lse_pool(_inputs()[0])
    assert kernels._CHOICE.made


def _as_on_a_gpu_machine(monkeypatch, load) -> None:
    """The decision logic as on a machine with a usable GPU, with `load` standing in for it."""
    monkeypatch.setattr(kernels, "cuda_problem", lambda: None)
    monkeypatch.setattr(kernels, "_load_kernels", load)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (UserError("building the CUDA kernels in /c failed: nvcc: error"), "nvcc: error"),
        (OSError("undefined symbol: _ZN3c10"), "loading them failed: undefined symbol"),
    ],
)
def test_a_failed_build_warns_and_falls_back_or_fails_under_require(
    monkeypatch, caplog, failure, reason
) -> None:
    def load() -> Path:
        raise failure

    _as_on_a_gpu_machine(monkeypatch, load)
    caplog.set_level(logging.INFO, logger=LOGGER)
    status = kernel_status()
    assert not status.active and status.degraded and reason in status.reason
    (record,) = _records(caplog)
    assert record.levelno == logging.WARNING and reason in record.getMessage()
    kernels.reset()
    monkeypatch.setenv(kernels.MODE_ENV, "require")
    with pytest.raises(UserError, match=f"ADAPT_DEPLOY_KERNELS=require, but .*{reason}"):
        kernel_status()


def test_loaded_kernels_are_named_in_the_log_line(monkeypatch, caplog) -> None:
    _as_on_a_gpu_machine(monkeypatch, lambda: Path("/cache/adapt_deploy_kernels.so"))
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert kernels.fused_kernels_active()
    (record,) = _records(caplog)
    assert record.levelno == logging.INFO
    assert "fused CUDA kernels (loaded from /cache/adapt_deploy_kernels.so)" in record.getMessage()
    logits = _inputs()[0]  # CPU tensors keep the reference
    torch.testing.assert_close(lse_pool(logits), lse_pool_reference(logits))


# ------------------------------------------------------------ auto: the measured winners only


def test_auto_runs_only_the_kernels_measured_faster(monkeypatch, caplog) -> None:
    """auto: a fused kernel only for (op, dtype) pairs in kernel_choice.FASTER; nothing is
    built or loaded for a dtype without one; one line per dtype says what runs and why."""
    loads: list[int] = []

    def load() -> Path:
        loads.append(1)
        return Path("/cache/adapt_deploy_kernels.so")

    _as_on_a_gpu_machine(monkeypatch, load)
    monkeypatch.setattr(kernel_choice, "FASTER", {"attention_pool": frozenset({"bfloat16"})})
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(2):
        assert not any(kernels.use_fused(op, torch.float32) for op in kernel_choice.OPS)
    assert not loads and not kernels._CHOICE.made  # fp32 has no winner: no build, no load
    (fp32_line,) = _records(caplog)
    assert "float32 CUDA tensors: PyTorch reference for every op" in fp32_line.getMessage()
    assert "ADAPT_DEPLOY_KERNELS=auto runs a fused kernel only where" in fp32_line.getMessage()
    assert kernels.use_fused("attention_pool", torch.bfloat16)
    assert not kernels.use_fused("attention_pool_backward", torch.bfloat16)
    assert not kernels.use_fused("lse_pool", torch.bfloat16)
    assert loads == [1]
    bf16_line = _records(caplog)[-1].getMessage()
    assert "bfloat16 CUDA tensors: fused CUDA kernels for attention_pool;" in bf16_line
    assert "PyTorch reference for lse_pool, lse_pool_backward, attention_pool_back" in bf16_line
    assert len(_records(caplog)) == 3  # fp32's line, the load line, bf16's line: once each


@pytest.mark.parametrize(("mode", "expected"), [("require", True), ("off", False)])
def test_require_runs_every_kernel_and_off_none(monkeypatch, mode, expected) -> None:
    _as_on_a_gpu_machine(monkeypatch, lambda: Path("/cache/adapt_deploy_kernels.so"))
    monkeypatch.setenv(kernels.MODE_ENV, mode)
    for op in kernel_choice.OPS:
        for dtype in cuda_impl.FUSED_DTYPES:
            assert kernels.use_fused(op, dtype) is expected


def test_auto_where_the_kernels_fail_to_load_runs_the_reference(monkeypatch, caplog) -> None:
    def load() -> Path:
        raise OSError("undefined symbol: _ZN3c10")

    _as_on_a_gpu_machine(monkeypatch, load)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert not kernels.use_fused("attention_pool", torch.bfloat16)
    warning, line = _records(caplog)
    assert warning.levelno == logging.WARNING and "undefined symbol" in warning.getMessage()
    assert "the fused kernels are not in use" in line.getMessage()


def test_the_choice_table_names_only_ops_and_dtypes_that_have_kernels() -> None:
    """A typo in kernel_choice.FASTER would silently keep a kernel off: every name must exist."""
    registered = {name.removeprefix("adapt_deploy::") for name in cuda_impl._IMPLEMENTATIONS}
    assert set(kernel_choice.OPS) == registered
    fused = {kernel_choice.dtype_name(d) for d in cuda_impl.FUSED_DTYPES}
    for op, dtypes in kernel_choice.FASTER.items():
        assert op in registered and dtypes <= fused, (op, dtypes)
    assert "NVIDIA" in kernel_choice.MEASURED_ON and "attention_pool" in kernel_choice.summary()


def test_a_cached_build_is_loaded_in_a_fresh_process() -> None:
    """Issue 14: a new process found the cached build, then asked the dispatcher about an
    operator not registered yet; that raised, so every run after the first build fell back to
    the reference. The library itself cannot load without a GPU: torch.ops.load_library is the
    one stand-in here, recording what it was asked to load."""
    script = """
from pathlib import Path
import torch
from adapt_deploy.ops import cuda_build, kernels
assert kernels._library_loaded() is False
build = cuda_build.Build(Path("/cache/b"), Path("/cache/b/adapt_deploy_kernels.so"), ("9.0",))
cuda_build.find_build = lambda capabilities, root=None: build
kernels._capabilities = lambda: [(9, 0)]
loaded = []
torch.ops.load_library = loaded.append
print(kernels._load_kernels(), loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    library = "/cache/b/adapt_deploy_kernels.so"
    assert result.stdout.strip() == f"{library} ['{library}']"


@cpu_torch
def test_no_cuda_registration_without_cuda_torch() -> None:
    assert not cuda_impl.registered()
    assert not cuda_impl.register_cuda_kernels()
    for name in ("lse_pool", "lse_pool_backward", "attention_pool", "attention_pool_backward"):
        qualname = f"adapt_deploy::{name}"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")


def test_fused_dtypes_are_what_the_binding_takes() -> None:
    binding = (cuda_build.KERNELS_DIR / "bindings.cpp").read_text()
    for dtype, name in [
        (torch.float32, "kFloat"),
        (torch.float16, "kHalf"),
        (torch.bfloat16, "kBFloat16"),
        (torch.float64, "kDouble"),
    ]:
        assert dtype in cuda_impl.FUSED_DTYPES and f"case at::{name}:" in binding


# ------------------------------------------------------------------------------ doctor


@cpu_torch
def test_doctor_reports_the_reference_and_why() -> None:
    check_ = next(c for c in doctor.run_checks() if c.name == "cuda kernels")
    assert check_.ok and check_.found.startswith("PyTorch reference (no CUDA")


@cpu_torch
def test_doctor_flags_require_that_cannot_be_met(monkeypatch) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, "require")
    check_ = next(c for c in doctor.run_checks() if c.name == "cuda kernels")
    assert not check_.ok and "require" in check_.advice


def test_doctor_on_a_gpu_machine_states_the_auto_rule(monkeypatch) -> None:
    """Where the kernels are usable, doctor says auto runs only the measured winners."""
    monkeypatch.setattr(kernels, "cuda_problem", lambda: None)
    monkeypatch.setattr(kernels, "_capabilities", lambda: [(9, 0)])
    monkeypatch.setattr(cuda_build, "find_build", lambda caps: None)
    monkeypatch.setattr(cuda_build, "build_problem", lambda: None)
    found, ok, advice = kernels.describe()
    assert ok and found.startswith("fused CUDA kernels (not built yet)")
    assert "ADAPT_DEPLOY_KERNELS=auto runs those measured faster on NVIDIA H200" in found
    assert "attention_pool (bfloat16)" in found and "first use" in advice
    monkeypatch.setenv(kernels.MODE_ENV, "require")
    assert "auto" not in kernels.describe()[0]


def test_doctor_flags_an_unknown_mode(monkeypatch) -> None:
    monkeypatch.setenv(kernels.MODE_ENV, "maybe")
    check_ = next(c for c in doctor.run_checks() if c.name == "cuda kernels")
    assert not check_.ok and "expected one of auto, off, require" in check_.advice


def test_doctor_command_shows_the_kernels_line() -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert "cuda kernels" in result.output


# ------------------------------------------------------------------------------- build


@pytest.mark.parametrize(
    ("text", "archs"),
    [("8.0;9.0+PTX", ("8.0", "9.0+PTX")), ("8.6, 12.0", ("8.6", "12.0")), (" 9.0 ", ("9.0",))],
)
def test_arch_lists_parse(text: str, archs: tuple[str, ...]) -> None:
    assert cuda_build.parse_archs(text) == archs


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("7.5", "older than the kernels' minimum"),
        ("sm_90", "expected architectures"),
        ("", "got ''"),
    ],
)
def test_bad_arch_lists_are_user_errors(text: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        cuda_build.parse_archs(text)


def test_gencode_flags_add_ptx_only_where_asked() -> None:
    assert cuda_build.gencode_flags(["8.0", "9.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


@pytest.mark.parametrize(
    ("capability", "runs"), [((8, 0), True), ((8, 6), False), ((9, 0), True), ((12, 0), True)]
)
def test_a_build_runs_on_its_archs_and_newer_gpus_through_ptx(capability, runs) -> None:
    assert cuda_build.covers(("8.0", "9.0+PTX"), capability) is runs


def test_cache_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(cuda_build.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda_build.cache_root() == tmp_path / "xdg" / "adapt_deploy" / "kernels"
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "mine"))
    assert cuda_build.cache_root() == tmp_path / "mine"


def test_editing_a_kernel_changes_the_build_directory(monkeypatch, tmp_path) -> None:
    copy = tmp_path / "cuda_kernels"
    shutil.copytree(cuda_build.KERNELS_DIR, copy)
    monkeypatch.setattr(cuda_build, "KERNELS_DIR", copy)
    before = cuda_build.build_dir(("9.0",), tmp_path)
    (copy / "common.cuh").write_text((copy / "common.cuh").read_text() + "\n// edited\n")
    after = cuda_build.build_dir(("9.0",), tmp_path)
    assert before != after and before.name[:-12] == after.name[:-12]  # only the hash differs
    assert "sm90" in after.name and torch.__version__ in after.name


def _fake_build(root: Path, archs: list[str], changes: dict | None = None) -> Path:
    directory = root / f"build-{'-'.join(archs)}"
    directory.mkdir(parents=True)
    (directory / "adapt_deploy_kernels.so").write_bytes(b"")
    cuda_build._write_manifest(
        cuda_build.Build(directory, directory / "adapt_deploy_kernels.so", tuple(archs))
    )
    if changes:
        manifest = directory / cuda_build.MANIFEST
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **changes}))
    return directory


def test_find_build_picks_a_finished_build_for_the_gpu(tmp_path) -> None:
    ampere = _fake_build(tmp_path, ["8.0", "8.6"])
    hopper = _fake_build(tmp_path, ["9.0+PTX"])
    assert cuda_build.find_build([(8, 6)], tmp_path).directory == ampere
    assert cuda_build.find_build([(9, 0), (10, 0)], tmp_path).directory == hopper
    assert cuda_build.find_build([(8, 6), (9, 0)], tmp_path) is None
    assert cuda_build.find_build([(8, 9)], tmp_path) is None
    assert cuda_build.find_build([(8, 0)], tmp_path / "missing") is None


@pytest.mark.parametrize(
    "changes", [{"torch": "0.0.1"}, {"digest": "0" * 64}, {"library": "gone.so"}, {"archs": 3}]
)
def test_find_build_ignores_stale_or_broken_builds(tmp_path, changes) -> None:
    _fake_build(tmp_path, ["8.0"], changes)
    assert cuda_build.find_build([(8, 0)], tmp_path) is None


@cpu_torch
def test_building_with_a_cpu_torch_says_what_is_missing() -> None:
    assert "CPU-only build" in cuda_build.build_problem()
    with pytest.raises(UserError, match=r"cannot build the CUDA kernels: torch .* CPU-only build"):
        cuda_build.build(("9.0",))


@cpu_torch
def test_kernels_build_command_is_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adapt_deploy.cli", "kernels", "build", "--arch", "9.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "CPU-only build" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["build", "check"])
def test_kernels_commands_have_help(command: str) -> None:
    result = CliRunner().invoke(app, ["kernels", command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_the_sources_ship_in_the_wheel_and_at_the_documented_path() -> None:
    assert (ROOT / "cuda_kernels").resolve() == cuda_build.KERNELS_DIR
    names = {p.name for p in cuda_build.sources()}
    assert {"attention_pool.cu", "lse_pool.cu", "bindings.cpp"} <= names
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    for suffix in {p.suffix for p in cuda_build.KERNELS_DIR.iterdir()}:
        assert f'"cuda_kernels/*{suffix}"' in package_data.split("\n[")[0], suffix


# -------------------------------------------------------------------------- CI compile check


def test_compile_commands_use_the_torch_headers_and_the_jit_flags() -> None:
    from torch.utils import cpp_extension

    for source in check.check_sources():
        command = check.compile_command(Path("/opt/cuda/bin/nvcc"), source, Path("out.o"))
        assert command[:3] == ["/opt/cuda/bin/nvcc", "-c", str(source)]
        for include in cpp_extension.include_paths():
            assert ["-isystem", include] == command[command.index(include) - 1 :][:2]
        assert {"-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Werror=all-warnings"} <= set(
            command
        )
        if source.suffix == ".cu":
            assert set(cpp_extension.COMMON_NVCC_FLAGS) <= set(command)
            assert "-gencode=arch=compute_80,code=sm_80" in command
            assert "-gencode=arch=compute_90,code=sm_90" in command


def test_the_check_is_skipped_with_a_note_without_nvcc(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(check, "find_nvcc", lambda: None)
    assert check.run_check(tmp_path) == 0
    assert "compile check skipped: nvcc not found" in capsys.readouterr().out


needs_nvcc = pytest.mark.skipif(check.find_nvcc() is None, reason="nvcc not found")


@pytest.mark.nvcc
@needs_nvcc
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x[0] = not_declared;", "not_declared"),
        ("int unused = 0; x[0] = 1.0f;", "never referenced"),  # a warning fails it too
    ],
)
def test_the_check_fails_on_a_broken_kernel(monkeypatch, tmp_path, capsys, body, message) -> None:
    source = tmp_path / "broken.cu"
    source.write_text(f"__global__ void kernel(float* x) {{ {body} }}\n")
    monkeypatch.setattr(check, "check_sources", lambda: [source])
    assert check.run_check(tmp_path, ("9.0",)) == 1
    out = capsys.readouterr().out
    assert "FAILED broken.cu" in out and message in out


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("nm")), reason="needs g++ and nm")
def test_the_check_catches_a_launcher_whose_signature_changed(tmp_path) -> None:
    """bindings.cpp calling f(int) while the kernels define f(long) only fails at link time."""
    files = {
        "binding.cpp": "namespace adapt_deploy_kernels { int f(int); }\n"
        "int call() { return adapt_deploy_kernels::f(1); }\n",
        "same.cpp": "namespace adapt_deploy_kernels { int f(int x) { return x; } }\n",
        "changed.cpp": "namespace adapt_deploy_kernels { int f(long x) { return int(x); } }\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        subprocess.run(["g++", "-c", name, "-o", f"{name}.o"], cwd=tmp_path, check=True)
    objects = {name: tmp_path / f"{name}.o" for name in files}
    assert check.missing_launchers(objects["binding.cpp"], [objects["same.cpp"]]) == []
    (missing,) = check.missing_launchers(objects["binding.cpp"], [objects["changed.cpp"]])
    assert "adapt_deploy_kernels" in missing


# ------------------------------------------------------------------------------ benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_the_gpu_benchmark_stops_cleanly_without_a_gpu(monkeypatch) -> None:
    from bench import kernels as bench_kernels

    monkeypatch.setattr(sys, "argv", ["bench.kernels"])
    with pytest.raises(SystemExit, match="no CUDA device: run this on a GPU machine"):
        bench_kernels.main()


def test_the_kernel_choice_rule_is_faster_at_every_timed_shape() -> None:
    """bench.kernels.kernel_choice: one slower shape keeps an (op, dtype) on the reference."""
    from bench.kernels import OpTiming, kernel_choice

    def timing(op: str, dtype: str, n: int, kernel: float, reference: float) -> OpTiming:
        return OpTiming(op, dtype, n, "65x129", kernel, reference, 0.5)

    timings = [
        timing("attention_pool", "bfloat16", 1, 0.07, 0.12),
        timing("attention_pool", "bfloat16", 8, 0.27, 0.80),
        timing("attention_pool", "float32", 1, 0.05, 0.06),
        timing("attention_pool", "float32", 8, 0.71, 0.43),  # slower here: not chosen
        timing("lse_pool", "float32", 1, 0.02, 0.02),  # a tie is not faster
    ]
    assert kernel_choice(timings) == {"attention_pool": ["bfloat16"]}


def test_the_benchmarked_references_and_byte_counts_run_on_cpu() -> None:
    """bench.kernels.op_cases: every op's reference call runs and returns the op's outputs;
    the bytes are the roofline's (the features-only backward never reads F)."""
    from bench.kernels import op_cases

    n, c, d, h, w = 2, 3, 5, 4, 6
    a, f, g = torch.randn(n, c, h, w), torch.randn(n, d, h, w), torch.randn(n, c, d)
    cases = {case.op: case for case in op_cases(a, f, g)}
    assert list(cases) == list(kernel_choice.OPS)
    size_a, size_f, size_g = 4 * n * c * h * w, 4 * n * d * h * w, 4 * n * c * d
    assert cases["attention_pool"].bytes_moved == size_a + size_f + size_g
    assert cases["attention_pool_backward"].bytes_moved == size_g + 2 * size_a + 2 * size_f
    assert cases["attention_pool_backward_features"].bytes_moved == size_g + size_a + size_f
    assert cases["attention_pool"].reference().shape == (n, c, d)
    grad_logits, grad_features = cases["attention_pool_backward"].reference()
    torch.testing.assert_close(cases["attention_pool_backward_features"].reference(), grad_features)
    assert grad_logits.shape == a.shape and cases["lse_pool_backward"].reference().shape == a.shape


def test_the_gpu_check_script_is_valid_and_its_kernel_bench_flags_parse() -> None:
    """bench/gpu_check.sh is run once per lent GPU: a syntax error or a stale flag would cost
    that run. Its bench.kernels flags must parse (the bench then stops: no GPU here)."""
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    (line,) = [s for s in text.splitlines() if "-m bench.kernels" in s]
    flags = line.split("-m bench.kernels", 1)[1].split()
    for module in ("bench.inference", "bench.stream", "bench.tta_cost", "adapt_deploy.cli"):
        assert f"-m {module}" in text
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernels", *flags], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "no CUDA device" in result.stderr, result.stderr
