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
