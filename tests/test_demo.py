import json

import cv2
import yaml

from adapt_deploy.data.synthetic.writer import SynthSpec
from adapt_deploy.data.weak import points_path
from adapt_deploy.demo import ADAPTED, DEMO_METHODS, demo_config, run_demo
from adapt_deploy.progress import Reporter, StageProgress

TINY = SynthSpec(
    num_source=8, num_target_train=8, num_target_val=4, num_videos=1, video_frames=6,
    source_size=(72, 128), target_size=(64, 128),
)  # fmt: skip
FAST = ["train.iterations=2", "train.batch_size=2", "train.device=cpu"]
FAST += [f"data.{d}.size=[32,64]" for d in ("source", "target", "val")]


def test_demo_configs_point_at_the_demo_data(tmp_path):
    for method in DEMO_METHODS:
        config = demo_config(method, tmp_path)
        assert config.train.method == method
        assert config.data.source.root == str(tmp_path / "source")
        assert config.data.val.root == str(tmp_path / "target") and config.data.val.split == "val"


def test_demo_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    first = run_demo(tmp_path, spec=TINY, overrides=FAST)
    assert set(first.results) == set(DEMO_METHODS)
    header, rows = first.table()
    assert header[0] == "class" and rows[-1][0] == "mIoU" and len(rows) == 20
    assert (tmp_path / "results.md").read_text().startswith("| class |")
    pretrained = tmp_path / "runs" / "pretrain" / "checkpoint.pt"
    for method in DEMO_METHODS:  # every method starts from the source-only pretrained model
        saved = yaml.safe_load((tmp_path / "runs" / method / "config.yaml").read_text())
        assert saved["model"]["init"] == str(pretrained)
    assert first.stream is not None and first.stream.frames == 6  # the video through the bundle
    overlay = tmp_path / "stream" / "overlay.mp4"
    assert cv2.VideoCapture(str(overlay)).get(cv2.CAP_PROP_FRAME_COUNT) == 6
    checkpoint = tmp_path / "runs" / "oracle" / "checkpoint.pt"
    stamp, overlay_stamp = checkpoint.stat().st_mtime_ns, overlay.stat().st_mtime_ns
    again = run_demo(tmp_path, spec=TINY, overrides=FAST)
    assert checkpoint.stat().st_mtime_ns == stamp  # not retrained
    assert overlay.stat().st_mtime_ns == overlay_stamp and again.stream == first.stream
    assert again.results["oracle"].miou == first.results["oracle"].miou
    assert again.reused == {"pretraining", *DEMO_METHODS, "export and stream"}
    assert "export and stream 0 s (reused)" in again.stage_line()
    changed = run_demo(tmp_path, spec=TINY, overrides=[*FAST, "optim.lr=0.001"])
    assert checkpoint.stat().st_mtime_ns != stamp  # another config: retrained
    assert set(changed.results) == set(DEMO_METHODS) and not changed.reused
    bundle_stamp = (tmp_path / "bundle" / "meta.json").stat().st_mtime_ns
    overlay_stamp = overlay.stat().st_mtime_ns
    fresh = run_demo(tmp_path, spec=TINY, overrides=[*FAST, "optim.lr=0.001"], fresh=True)
    assert not fresh.reused  # --fresh redoes every stage, the export and the stream too
    assert (tmp_path / "bundle" / "meta.json").stat().st_mtime_ns != bundle_stamp
    assert overlay.stat().st_mtime_ns != overlay_stamp


def test_demo_times_its_stages_and_records_them(tmp_path):
    demo = run_demo(tmp_path, spec=TINY, overrides=FAST)
    stages = ["synthesis", "pretraining", "weak labels", *DEMO_METHODS, "export and stream"]
    assert list(demo.stages) == stages and all(s >= 0 for s in demo.stages.values())
    assert demo.stage_line().startswith("synthesis ") and "; total " in demo.stage_line()
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["seed"] == 0 and list(record["stages"]) == stages
    assert record["miou"] == demo.miou() and set(record["iou"]) == set(DEMO_METHODS)
    assert record["iou"]["oracle"]["road"] == round(100 * demo.results["oracle"].iou[0], 2)
    # the stream goes through the adapted model's bundle
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    assert meta["checkpoint"]["method"] == ADAPTED


def test_demo_seed_seeds_training_and_the_point_draw(tmp_path):
    demo = run_demo(tmp_path, spec=TINY, overrides=FAST, seed=3)
    assert demo.seed == 3 and json.loads((tmp_path / "demo.json").read_text())["seed"] == 3
    for run in ("pretrain", *DEMO_METHODS):
        saved = yaml.safe_load((tmp_path / "runs" / run / "config.yaml").read_text())
        assert saved["train"]["seed"] == 3 and saved["adapt"]["point_seed"] == 3
    assert points_path(tmp_path / "data" / "target", "train", 3).is_file()


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def task(self, description, total):
        self.events.append(("task", description, total))
        return super().task(description, total)

    def advance(self, steps=1, status=None):
        self.events.append(("advance", steps))


def test_stage_progress_opens_one_task_per_stage_and_counts_to_the_total():
    recorder = Recorder()
    with StageProgress(recorder) as progress:
        for done in range(0, 4):
            progress("source", done, 3)
        progress("target", 0, 2)
        progress("target", 2, 2)
    assert recorder.events == [
        ("task", "source", 3), ("advance", 1), ("advance", 1), ("advance", 1),
        ("task", "target", 2), ("advance", 2),
    ]  # fmt: skip
