"""Data-parallel training: shards of the global batch, and two gloo processes under torchrun
taking the steps one process takes on the whole batch, stopped by a signal and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import method_overrides

from adapt_deploy.config import load_config
from adapt_deploy.data.weak import write_class_stats, write_points
from adapt_deploy.engine.distributed import (
    World,
    check_global_batch,
    launch_training,
    torchrun_command,
    world_from_env,
)
from adapt_deploy.engine.sampling import EpochBatchSampler
from adapt_deploy.engine.train import train
from adapt_deploy.errors import UserError
from adapt_deploy.models.checkpoints import load_weights_only, read_checkpoint
from adapt_deploy.registry import METHODS

# WDA with both kinds of discriminator; frozen BN, so that the two processes' halves of each
# batch give exactly the gradients of the whole batch (dropout keeps its default 0.1: its masks
# are drawn for the whole batch, adapt/seeded_dropout.py).
SETTINGS = [
    "train.method=wda_uda",
    "model.freeze_bn=true",
    "train.batch_size=2",
    "train.iterations=6",
    "optim.schedule_iters=6",
    "train.checkpoint_every=2",
    "train.tensorboard=false",
    "adapt.cw_hidden=64",  # small discriminators: the test is about the gradients, not them
]


def test_the_shards_of_each_process_make_up_the_global_batch():
    for start in (0, 3, 7):
        whole = iter(EpochBatchSampler(10, 4, seed=2, start=start))
        shards = [iter(EpochBatchSampler(10, 4, 2, start, rank, 2)) for rank in (0, 1)]
        for _ in range(6):
            assert next(whole) == next(shards[0]) + next(shards[1])
    with pytest.raises(ValueError, match="does not split"):
        EpochBatchSampler(10, 3, seed=0, rank=0, world_size=2)


def test_the_world_comes_from_torchrun_s_environment():
    assert world_from_env({}) == World()
    world = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert world == World(1, 2, 1) and world.distributed and not world.primary
    with pytest.raises(UserError, match="must be integers"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="RANK=2"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match=r"train\.batch_size.*multiple of 2"):
        check_global_batch(3, World(0, 2, 0))
    command = torchrun_command(4, ["--config", "c.yaml"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[-3:] == ["train", "--config", "c.yaml"]
    with pytest.raises(UserError, match="--nproc"):
        torchrun_command(0, [])


def test_nproc_is_refused_inside_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="under torchrun"):
        launch_training(2, tmp_path / "c.yaml", [], tmp_path / "run", False)


def _cli_train(config: Path, out: Path, *args: str) -> subprocess.Popen:
    """`adapt-deploy train --nproc 2` in a subprocess (gloo on CPU)."""
    command = [sys.executable, "-m", "adapt_deploy.cli", "train", "--config", str(config)]
    command += ["--out", str(out), "--nproc", "2", *[a for s in SETTINGS for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(run: Path) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _assert_same_state(a: Path, b: Path) -> None:
    """The same network, discriminators and optimizer moments in two runs' trainer states."""
    first = load_weights_only(a / "trainer_state.pt", "trainer state")
    second = load_weights_only(b / "trainer_state.pt", "trainer state")
    assert first["iteration"] == second["iteration"]
    for key, value in first["model"].items():
        torch.testing.assert_close(value, second["model"][key], rtol=1e-4, atol=1e-5)
    # Adam divides by the root of its second moment, which magnifies the last-bit differences
    # of summing gradients in another order where a gradient is near zero.
    for name, weights in first["discriminators"].items():
        for key, value in weights.items():
            torch.testing.assert_close(
                value, second["discriminators"][name][key], rtol=1e-3, atol=1e-4
            )
    momentum = [s["momentum_buffer"] for s in first["optimizer"]["state"].values()]
    other = [s["momentum_buffer"] for s in second["optimizer"]["state"].values()]
    for x, y in zip(momentum, other, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.fixture
def one_process(tmp_path, tiny_config_file) -> Path:
    """The reference: one process, the whole batch of 2."""
    train(load_config(tiny_config_file, SETTINGS), tmp_path / "one")
    return tmp_path / "one"


def test_two_processes_take_the_steps_one_process_takes(tmp_path, tiny_config_file, one_process):
    two = tmp_path / "two"
    run = _cli_train(tiny_config_file, two)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert output.count("checkpoint:") == 1  # rank 0 alone reports
    logged = _losses(one_process), _losses(two)
    assert [r["iteration"] for r in logged[1]] == list(range(1, 7))
    for a, b in zip(*logged, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key != "images_per_second":
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    _assert_same_state(one_process, two)
    # The two processes' shards of the val split make the one-process confusion matrix.
    evaluations = [json.loads((run / "eval.json").read_text()) for run in (one_process, two)]
    assert evaluations[0]["confusion"] == evaluations[1]["confusion"]
    assert json.loads((two / "best.json").read_text())["iteration"] == 6
    written = {p.name for p in two.iterdir()} - {"best.json", "best.pt", "eval.json"}
    assert written == {"checkpoint.pt", "config.yaml", "metrics.jsonl", "trainer_state.pt"}


def test_a_stopped_two_process_run_resumes_in_one_process(tmp_path, tiny_config_file):
    long = ["train.iterations=400", "optim.schedule_iters=400"]
    out = tmp_path / "stopped"
    run = _cli_train(tiny_config_file, out, *[a for s in long for a in ("--set", s)])
    state = out / "trainer_state.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, run.communicate()[0]
    run.send_signal(signal.SIGTERM)  # the launcher passes it to torchrun, which passes it on
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    stopped_at = read_checkpoint(out / "checkpoint.pt")["meta"]["iteration"]
    assert 2 <= stopped_at < 400, output
    assert load_weights_only(state, "trainer state")["iteration"] == stopped_at
    # Two more iterations in one process end where one process running throughout ends.
    more = [*SETTINGS, *long, f"train.iterations={stopped_at + 2}"]
    train(load_config(tiny_config_file, more), out, resume=True, evaluate_at_end=False)
    train(load_config(tiny_config_file, more), tmp_path / "one", evaluate_at_end=False)
    _assert_same_state(tmp_path / "one", out)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_takes_the_one_process_steps_in_two_processes(
    tmp_path, tiny_config_file, cityscapes_root, method
):
    """4 iterations of each method in two gloo processes against one process on the whole batch:
    the same losses, weights, optimizer moments, extra heads (LabOR's selector) and LabOR's
    labelled points (its round comes after 2 iterations; CBST's and CRST's two pseudo-label
    rounds show in the losses after them). Losses over a varying number of pixels and
    ClassMix's draws need the engine's collectives for this (adapt/data_parallel.py)."""
    write_class_stats(cityscapes_root, "cityscapes", "train")
    write_points(cityscapes_root, "cityscapes", "train", seed=0)
    needs = method_overrides(method, tiny_config_file, tmp_path)
    extra = [
        f"train.method={method}", "train.iterations=4", "optim.schedule_iters=4",
        "selftrain.rounds=2", "labor.rounds=1", "labor.warmup=0.5", *needs,
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(tiny_config_file, [*SETTINGS, *extra]), one)
    run = _cli_train(tiny_config_file, two, *[a for s in extra for a in ("--set", s)])
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-3000:]
    for a, b in zip(_losses(one), _losses(two), strict=True):
        for key in a:
            if key != "images_per_second":
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["iteration"], key)
    _assert_same_state(one, two)
    heads = [read_checkpoint(r / "checkpoint.pt").get("heads") or {} for r in (one, two)]
    assert set(heads[0]) == set(heads[1])
    for name, weights in heads[0].items():
        for key, value in weights.items():
            torch.testing.assert_close(value, heads[1][name][key], rtol=1e-4, atol=1e-5)
    labels = [r / "labels" / "points.json" for r in (one, two)]
    if labels[0].is_file():
        assert json.loads(labels[0].read_text()) == json.loads(labels[1].read_text())
