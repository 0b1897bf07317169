import json

import pytest
import torch
from helpers import assert_same_weights

from adapt_deploy.config import load_config
from adapt_deploy.data.weak import write_class_stats
from adapt_deploy.engine.sampling import EpochBatchSampler
from adapt_deploy.engine.train import poly_lr, train
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.models.checkpoints import load_checkpoint, read_checkpoint
from adapt_deploy.progress import Reporter


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in records(run_dir) if "loss" in r]  # not the evaluation records


def test_twenty_iterations_lower_the_loss_and_write_an_evaluated_checkpoint(
    tmp_path, tiny_config_file
):
    config = load_config(tiny_config_file)
    result = train(config, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5
    assert result.evaluation is not None and 0.0 <= result.evaluation.miou <= 1.0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["miou"] >= 0
    evaluation = records(tmp_path / "run")[-1]  # the final evaluation, logged with the losses
    assert evaluation["iteration"] == 20 and evaluation["eval"]["miou"] >= 0
    assert records(tmp_path / "run")[0]["images_per_second"] > 0
    model, saved = load_checkpoint(result.checkpoint)
    assert saved == config and not model.training
    meta = read_checkpoint(result.checkpoint)["meta"]
    assert meta["iteration"] == 20 and meta["normalization"]["color_order"] == "RGB"
    assert len(meta["classes"]) == 19 and meta["architecture"]["backbone"] == "resnet18"


def test_oracle_trains_on_the_target_split(tmp_path, tiny_config_file):
    config = load_config(tiny_config_file, ["train.method=oracle", "train.iterations=2"])
    result = train(config, tmp_path / "oracle", evaluate_at_end=False)
    assert result.iterations == 2 and result.evaluation is None


def test_model_init_starts_from_a_checkpoint_and_refuses_another_architecture(
    tmp_path, tiny_config_file
):
    first = train(load_config(tiny_config_file, ["train.iterations=2"]), tmp_path / "a", False)
    init = [f"model.init={first.checkpoint}", "train.iterations=1", "optim.lr=0.0"]
    config = load_config(tiny_config_file, [*init, "optim.momentum=0.0", "model.freeze_bn=true"])
    second = train(config, tmp_path / "b", evaluate_at_end=False)
    start = read_checkpoint(first.checkpoint)["model"]
    after = read_checkpoint(second.checkpoint)["model"]
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0, frozen BN: unchanged
    wider = load_config(tiny_config_file, [*init, "model.width=32"])
    with pytest.raises(UserError, match=r"model\.init.*with another shape"):
        train(wider, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(UserError, match="checkpoint not found"):
        train(load_config(tiny_config_file, ["model.init=nope.pt"]), tmp_path / "d")


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, tiny_config_file):
    straight = load_config(tiny_config_file, ["train.iterations=8", "optim.schedule_iters=8"])
    train(straight, tmp_path / "straight", evaluate_at_end=False)
    first = load_config(tiny_config_file, ["train.iterations=4", "optim.schedule_iters=8"])
    train(first, tmp_path / "split", evaluate_at_end=False)
    train(straight, tmp_path / "split", resume=True, evaluate_at_end=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "split"), rel=1e-5)


@pytest.mark.parametrize("method", ["wda_image", "selftrain_image"])
def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_one(
    tmp_path, tiny_config_file, cityscapes_root, method
):
    """These methods drop out logits before LSE pooling (adapt.dropout 0.1): the masks come
    from (seed, iteration), so the resumed run's weights are bit for bit the straight run's."""
    write_class_stats(cityscapes_root, "cityscapes", "train")
    both = [f"train.method={method}", "optim.schedule_iters=4"]
    train(load_config(tiny_config_file, [*both, "train.iterations=4"]), tmp_path / "straight",
          evaluate_at_end=False)  # fmt: skip
    train(load_config(tiny_config_file, [*both, "train.iterations=2"]), tmp_path / "split",
          evaluate_at_end=False)  # fmt: skip
    train(load_config(tiny_config_file, [*both, "train.iterations=4"]), tmp_path / "split",
          resume=True, evaluate_at_end=False)  # fmt: skip
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    split = read_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_eval_every_logs_evaluations_and_keeps_the_best_model(tmp_path, tiny_config_file):
    every = ["train.iterations=6", "optim.schedule_iters=12", "train.eval_every=2"]
    train(load_config(tiny_config_file, every), tmp_path / "run")
    evaluations = [r for r in records(tmp_path / "run") if "eval" in r]
    assert [r["iteration"] for r in evaluations] == [2, 4, 6]
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    top = max(evaluations, key=lambda r: r["eval"]["miou"])
    assert best["miou"] == pytest.approx(top["eval"]["miou"], abs=0.01)
    assert read_checkpoint(tmp_path / "run" / "best.pt")["meta"]["iteration"] == best["iteration"]
    # A resumed run continues the record: a better model replaces best.pt, a worse one does not.
    longer = load_config(tiny_config_file, [*every[1:], "train.iterations=8"])
    train(longer, tmp_path / "run", resume=True)
    evaluations = [r for r in records(tmp_path / "run") if "eval" in r]
    assert [r["iteration"] for r in evaluations] == [2, 4, 6, 8]
    resumed = json.loads((tmp_path / "run" / "best.json").read_text())
    assert resumed["miou"] == pytest.approx(max(r["eval"]["miou"] for r in evaluations), abs=0.01)
    (tmp_path / "run" / "best.json").write_text("{}")
    with pytest.raises(UserError, match=r"best\.json"):
        train(
            load_config(tiny_config_file, [*every[1:], "train.iterations=9"]),
            tmp_path / "run",
            resume=True,
        )


def test_required_tensorboard_fails_before_anything_is_written(
    tmp_path, tiny_config_file, monkeypatch
):
    from adapt_deploy.engine import run_log

    monkeypatch.setattr(run_log, "summary_writer_class", lambda: None)
    config = load_config(tiny_config_file, ["train.tensorboard=true"])
    with pytest.raises(UserError, match=r"train\.tensorboard.*adapt-deploy\[tb\]"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_never_overwritten(tmp_path, tiny_config_file):
    config = load_config(tiny_config_file, ["train.iterations=1"])
    train(config, tmp_path / "run", evaluate_at_end=False)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        train(config, tmp_path / "run", evaluate_at_end=False)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_changed_model(tmp_path, tiny_config_file):
    train(
        load_config(tiny_config_file, ["train.iterations=1"]), tmp_path / "r", evaluate_at_end=False
    )
    changed = load_config(tiny_config_file, ["train.iterations=2", "model.width=16"])
    with pytest.raises(ConfigError, match=r"model\.width"):
        train(changed, tmp_path / "r", resume=True)


def test_a_finished_run_can_be_trained_longer(tmp_path, tiny_config_file):
    short = ["train.iterations=2", "optim.schedule_iters=2"]
    train(load_config(tiny_config_file, short), tmp_path / "r", evaluate_at_end=False)
    longer = load_config(tiny_config_file, ["train.iterations=4", "optim.schedule_iters=4"])
    assert train(longer, tmp_path / "r", resume=True, evaluate_at_end=False).iterations == 4
    assert len(losses(tmp_path / "r")) == 4


def test_resume_needs_a_saved_state(tmp_path, tiny_config_file):
    with pytest.raises(UserError, match="nothing to resume"):
        train(load_config(tiny_config_file), tmp_path / "none", resume=True)


def test_poly_schedule():
    assert poly_lr(0.1, 0, 100, 0.9) == 0.1
    assert poly_lr(0.1, 50, 100, 0.9) == pytest.approx(0.1 * 0.5**0.9)
    assert poly_lr(0.1, 100, 100, 0.9) == 0.0


def test_sampler_resumes_the_same_sequence_across_epochs():
    full = EpochBatchSampler(10, 3, seed=4)
    stream = iter(full)
    batches = [next(stream) for _ in range(7)]
    resumed = iter(EpochBatchSampler(10, 3, seed=4, start=4))
    assert [next(resumed) for _ in range(3)] == batches[4:]
    assert all(len(b) == 3 for b in batches)
    first_epoch = [i for batch in batches[:3] for i in batch]
    assert len(set(first_epoch)) == 9  # an epoch never repeats an item
    assert batches[:3] != batches[3:6]  # and each epoch is reshuffled


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint(junk)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="'model' and 'meta'"):
        read_checkpoint(tmp_path / "foreign.pt")


class InterruptAt(Reporter):
    """Raises KeyboardInterrupt (as Ctrl-C would) after `limit` training steps."""

    def __init__(self, limit: int) -> None:
        self.limit, self.steps = limit, 0

    def advance(self, steps=1, status=None):
        self.steps += steps
        if self.steps == self.limit:
            raise KeyboardInterrupt


def test_ctrl_c_saves_the_state_and_the_run_resumes(tmp_path, tiny_config_file):
    config = load_config(tiny_config_file, ["train.iterations=6", "train.checkpoint_every=100"])
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", reporter=InterruptAt(3), evaluate_at_end=False)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["meta"]["iteration"] == 3
    result = train(config, tmp_path / "run", resume=True, evaluate_at_end=False)
    assert result.iterations == 6 and len(losses(tmp_path / "run")) == 6


def test_a_signal_inside_an_iteration_stops_after_it_with_that_iteration_s_state(
    tiny_config_file, tmp_path, monkeypatch
):
    """SIGTERM between the optimizer's step and the end of iteration 3: the run finishes that
    iteration and saves it whole, so it holds what a 3-iteration run holds (a stop inside the
    iteration saved the stepped weights as iteration 2's, and the resumed run diverged)."""
    import os
    import signal

    from adapt_deploy.adapt.base import Method
    from adapt_deploy.models.checkpoints import load_weights_only
    from adapt_deploy.signals import SignalInterrupt

    def signalled_after_step(self, iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Method, "after_step", signalled_after_step)
    stopped = tmp_path / "stopped"
    with pytest.raises(SignalInterrupt):
        train(load_config(tiny_config_file, ["train.checkpoint_every=100"]), stopped)
    assert load_weights_only(stopped / "trainer_state.pt", "trainer state")["iteration"] == 3
    logged = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2, 3] and "stop requested" not in logged[-1]
    monkeypatch.undo()
    three = tmp_path / "three"
    train(load_config(tiny_config_file, ["train.iterations=3"]), three, evaluate_at_end=False)
    assert_same_weights(stopped, three)
