"""bench/adaptation.py: which finished or killed runs are reused, continued or trained again.

`train` is replaced by a stand-in that writes what a run leaves (config.yaml, checkpoint,
trainer state, eval.json), so the reuse rules are checked in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bench.adaptation as adaptation
from adapt_deploy.config import dump_config
from adapt_deploy.demo import ADAPT_STAGE, demo_config
from adapt_deploy.engine.evaluate import EvalResult
from adapt_deploy.engine.train import TRAINER_STATE, TrainResult
from adapt_deploy.progress import Reporter

CLASSES = [f"class{i}" for i in range(19)]


class FakeTrain:
    """Records every call; a run's 'weights' are its call number, so a retrain changes them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, config, out: Path, reporter=None, resume: bool = False) -> TrainResult:
        self.calls.append((out.name, resume))
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")
        (out / "checkpoint.pt").write_text(f"weights {len(self.calls)}")
        (out / TRAINER_STATE).write_text("state")
        evaluation = EvalResult(np.eye(19, dtype=np.int64) * (len(self.calls) + 1), CLASSES)
        (out / "eval.json").write_text(json.dumps(evaluation.to_dict()))
        return TrainResult(out / "checkpoint.pt", 10, 5.0, evaluation)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTrain:
    stand_in = FakeTrain()
    monkeypatch.setattr(adaptation, "train", stand_in)
    return stand_in


def _once(run_dir: Path, config, stale: bool = False) -> tuple[dict, bool]:
    return adaptation._train_once(run_dir, config, Reporter(), run_dir.name, stale=stale)


def test_finished_run_is_reused_only_for_the_same_config(tmp_path: Path, fake: FakeTrain) -> None:
    run_dir = tmp_path / "runs" / "source_only_seed0"
    config = demo_config("source_only", tmp_path / "data", ["train.seed=0"])
    record, trained = _once(run_dir, config)
    assert trained and record["miou"] == 100.0 and record["seconds"] == 5.0
    assert record["iou"]["class0"] == 100.0
    assert _once(run_dir, config) == (record, False)
    other = demo_config("source_only", tmp_path / "data", ["train.seed=0", "optim.lr=0.001"])
    assert _once(run_dir, other)[1] is True  # another --set: trained again
    assert _once(run_dir, other)[1] is False
    assert _once(run_dir, other, stale=True)[1] is True  # what it starts from was retrained
    assert fake.calls == [(run_dir.name, False)] * 3


def test_pretraining_again_makes_its_dependents_stale(tmp_path: Path, fake: FakeTrain) -> None:
    pretrain = tmp_path / "runs" / "pretrain_seed0"
    method = tmp_path / "runs" / "wda_uda_seed0"
    source = demo_config("source_only", tmp_path / "data", ["train.seed=0"])
    stage = [f"model.init={pretrain / 'checkpoint.pt'}", "train.seed=0"]
    config = demo_config("wda_uda", tmp_path / "data", stage)
    _once(pretrain, source)
    assert _once(method, config)[1] is True
    assert _once(method, config)[1] is False
    # Pretraining redone (here in another call): the method's recorded starting point changed.
    _once(pretrain, demo_config("source_only", tmp_path / "data", ["train.seed=0", "optim.lr=1"]))
    assert _once(method, config)[1] is True
    assert _once(method, config)[1] is False


def test_killed_run_is_continued_only_with_the_same_config(tmp_path: Path, fake: FakeTrain) -> None:
    run_dir = tmp_path / "runs" / "oracle_seed0"
    config = demo_config("oracle", tmp_path / "data", ["train.seed=0"])
    run_dir.mkdir(parents=True)
    dump_config(config, run_dir / "config.yaml")
    (run_dir / TRAINER_STATE).write_text("state at iteration 5")
    assert _once(run_dir, config)[1] is True
    assert fake.calls[-1] == (run_dir.name, True)
    (run_dir / "eval.json").unlink()
    (run_dir / adaptation.SECONDS_FILE).unlink()
    other = demo_config("oracle", tmp_path / "data", ["train.seed=1"])
    assert _once(run_dir, other)[1] is True
    assert fake.calls[-1] == (run_dir.name, False)  # deleted and trained afresh


def test_runs_of_the_earlier_format_are_still_reused(tmp_path: Path, fake: FakeTrain) -> None:
    run_dir = tmp_path / "runs" / "source_only_seed0"
    config = demo_config("source_only", tmp_path / "data", ["train.seed=0"])
    _once(run_dir, config)
    (run_dir / adaptation.SECONDS_FILE).unlink()
    (run_dir / "result.json").write_text(json.dumps({"miou": 50.0, "seconds": 7.0}))
    record, trained = _once(run_dir, config)
    assert not trained and record["seconds"] == 7.0 and len(fake.calls) == 1


def _runs(miou: list[float], seconds: float, labelled: float | None = 0.0) -> dict[int, dict]:
    iou = {"road": 50.0, "car": 10.0}
    return {
        seed: {"miou": m, "seconds": seconds, "iou": iou, "labelled": labelled}
        for seed, m in enumerate(miou)
    }


def test_the_table_gives_spread_gap_cost_and_the_paper_number() -> None:
    results = {
        "selftrain": _runs([30.0, 32.0, 34.0], 250.0),
        "source_only": _runs([20.0, 20.0, 20.0], 100.0),
        "oracle": _runs([60.0, 60.0, 60.0], 80.0, labelled=1000.0),
        "labor_random@spl": _runs([40.0, 40.0, 40.0], 120.0, labelled=None),
    }
    rows = adaptation.table(results).splitlines()
    order = ["| source_only", "| selftrain", "| oracle", "| labor_random@spl"]
    assert [r.split(" | ")[0] for r in rows[2:]] == order
    cells = rows[3].split(" | ")
    assert cells[1:7] == ["32.0 ± 2.0", "3", "30%", "0", "250", "2.5"]  # 12 of 40 points
    assert cells[7] == str(adaptation.PAPER["selftrain"])
    assert rows[4].split(" | ")[4] == "1000"  # the oracle's labelled pixels per image
    assert rows[5].split(" | ")[4] == "-"  # unknown label cost


def test_collect_tabulates_finished_runs_and_names_the_missing(tmp_path: Path, fake) -> None:
    pretrain = tmp_path / "runs" / "pretrain_seed0" / "checkpoint.pt"
    pretrain.parent.mkdir(parents=True)
    pretrain.write_text("weights")
    stage = [f"model.init={pretrain}", *ADAPT_STAGE, "train.seed=0", "adapt.point_seed=0"]
    config = demo_config("oracle", tmp_path / "data", stage)
    record, _ = _once(tmp_path / "runs" / "oracle_seed0", config)
    results, missing = adaptation.collect(tmp_path, [0, 1], ["oracle", "selftrain"], [])
    assert results == {"oracle": {0: {**record, "labelled": None}}}  # no class statistics here
    assert missing == ["selftrain seed 0", "oracle seed 1", "selftrain seed 1"]
    pretrain.write_text("other weights")  # the oracle run no longer starts from this model
    assert adaptation.collect(tmp_path, [0], ["oracle"], [])[0] == {}
    assert len(fake.calls) == 1  # collecting trains nothing


def test_rows_train_their_method_on_their_data_and_budget(tmp_path: Path) -> None:
    single = adaptation._row_config(tmp_path, "adaptsegnet@synthia", 0, ["train.seed=0"])
    assert single.train.method == "adaptsegnet" and single.data.source.kind == "synthia"
    assert single.data.source.root == str(tmp_path / adaptation.MULTI_SOURCE_DATA / "synthia")
    multi = adaptation._row_config(tmp_path, "multisource", 0, [])
    assert [Path(s.root).name for s in multi.data.sources] == ["source", "synthia"]
    assert adaptation._row_config(tmp_path, "adaptsegnet", 0, []).data.source.kind == "gta5"
    spl = adaptation._run_dir(tmp_path, "labor_spl", 0) / "labels"
    spl.mkdir(parents=True)
    (spl / "summary.json").write_text(json.dumps({"asked_per_image": 2871.6}))
    matched = adaptation._row_config(tmp_path, "labor_random@spl", 0, [])
    assert matched.train.method == "labor_random" and matched.labor.budget == 2872
    assert adaptation.label_cost("labor_random@spl", spl.parent, tmp_path, 0) == 2871.6
