"""`adapt-deploy stream`: real videos written by OpenCV, image folders, a local HTTP MJPEG camera,
the outputs checked frame by frame against the runtime's own output, and SIGTERM mid-stream."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from adapt_deploy.channel import Channel
from adapt_deploy.cli import app
from adapt_deploy.errors import UserError
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.colors import colour_table, overlay
from adapt_deploy.stream import (
    SourceError,
    StreamOptions,
    StreamSummary,
    open_source,
    pipeline,
    stream,
)
from adapt_deploy.stream import demo as stream_demo
from adapt_deploy.stream import outputs as stream_outputs
from adapt_deploy.stream.outputs import OutputError
from adapt_deploy.stream.sources import LiveStream

SIZE = (64, 128)  # (H, W)
FPS = 10.0


def drive_frame(i: int, height: int = SIZE[0], width: int = SIZE[1]) -> np.ndarray:
    """An RGB frame of class-coloured bands that move with `i`, with a frame number."""
    rows = (np.arange(height)[:, None] + 2 * i) // max(height // 6, 1) % 6
    colours = np.array([[70, 130, 180], [70, 70, 70], [107, 142, 35], [0, 0, 142],
                        [244, 35, 232], [128, 64, 128]], np.uint8)  # fmt: skip
    image = np.ascontiguousarray(np.broadcast_to(colours[rows], (height, width, 3)))
    cv2.putText(image, str(i), (4, height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255))
    return image


def write_video(path: Path, count: int, size: tuple[int, int] = SIZE, start: int = 0) -> Path:
    """A real video written by OpenCV's VideoWriter (mp4v)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, size[::-1])
    assert writer.isOpened()
    for i in range(start, start + count):
        writer.write(cv2.cvtColor(drive_frame(i, *size), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame OpenCV decodes from `path`, as RGB."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, offset, size) of the MP4 boxes in data[start:end]."""
    offset, end = start, len(data) if end is None else end
    while offset + 8 <= end:
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        yield kind, offset, size
        offset += size


def faststart(data: bytes) -> bytes:
    """The MP4 with its index (moov) moved before the media data, as cameras and web servers
    write them; chunk offsets (stco) are shifted to match."""
    top = {kind: (offset, size) for kind, offset, size in mp4_boxes(data)}
    moov_at, moov_size = top[b"moov"]
    moov = bytearray(data[moov_at : moov_at + moov_size])

    def shift(start: int, end: int) -> None:
        for kind, offset, size in list(mp4_boxes(moov, start, end)):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift(offset + 8, offset + size)
            elif kind == b"stco":
                (count,) = struct.unpack(">I", moov[offset + 12 : offset + 16])
                for k in range(offset + 16, offset + 16 + 4 * count, 4):
                    (value,) = struct.unpack(">I", moov[k : k + 4])
                    moov[k : k + 4] = struct.pack(">I", value + moov_size)

    shift(8, moov_size)
    mdat_at = top[b"mdat"][0]
    return data[:mdat_at] + bytes(moov) + data[mdat_at:moov_at] + data[moov_at + moov_size :]


@pytest.fixture(scope="module")
def segmenter(tiny_bundle: Path):
    with Segmenter.from_bundle(tiny_bundle, backend="onnxruntime") as seg:
        yield seg


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("videos") / "drive.mp4", 20)


# --------------------------------------------------------------------------------------------
# Files: every frame, the three outputs against the runtime
# --------------------------------------------------------------------------------------------


def test_stream_command_writes_overlay_labels_and_stats(tiny_bundle, video, segmenter, tmp_path):
    out, labels, stats = tmp_path / "overlay.mp4", tmp_path / "labels", tmp_path / "s.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "stream", str(video), "--bundle", str(tiny_bundle), "--out", str(out),
            "--labels-dir", str(labels), "--stats", str(stats), "--backend", "onnxruntime",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "20 frames" in result.output and "p95" in result.output
    capture = cv2.VideoCapture(str(out))
    assert capture.get(cv2.CAP_PROP_FPS) == FPS
    assert (capture.get(cv2.CAP_PROP_FRAME_HEIGHT), capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == SIZE
    assert len(read_video(out)) == 20
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(20))
    assert records[3]["timestamp"] == pytest.approx(3 / FPS)
    assert all(r["latency"] >= r["infer"] > 0 for r in records)
    for i, frame in enumerate(read_video(video)):  # the same decoded frames, run directly
        expected = segmenter(frame)
        png = cv2.imread(str(labels / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, expected.labels)
        presence = np.array([records[i]["presence"][c] for c in segmenter.classes])
        np.testing.assert_allclose(presence, expected.presence, atol=1e-4)


def test_max_frames_and_an_overlay_of_the_labels(video, segmenter, tmp_path):
    options = StreamOptions(out=tmp_path / "o.mkv", max_frames=5, alpha=1.0)
    summary = stream(open_source(str(video)), segmenter, options)
    assert (summary.frames, summary.decoded, summary.skipped) == (5, 5, 0)
    written = read_video(tmp_path / "o.mkv")
    expected = colour_table(segmenter.palette)[segmenter(read_video(video)[0]).labels]
    assert len(written) == 5 and np.abs(written[0].astype(int) - expected).mean() < 8


def test_overlay_blends_the_palette_over_the_frame():
    image = np.full((4, 6, 3), 200, np.uint8)
    labels = np.zeros((4, 6), np.uint8)
    labels[:, 3:] = 2
    table = colour_table(np.array([[0, 0, 0], [9, 9, 9], [100, 0, 50]], np.uint8))
    np.testing.assert_array_equal(overlay(image, labels, table, 0.0), image)
    blended = overlay(image, labels, table, 0.5)
    assert blended[0, 0].tolist() == [100, 100, 100] and blended[0, 5].tolist() == [150, 100, 125]


# --------------------------------------------------------------------------------------------
# Damaged and unusual input
# --------------------------------------------------------------------------------------------


def test_damaged_frames_inside_an_mp4_are_skipped_and_counted(segmenter, tmp_path):
    data = bytearray((write_video(tmp_path / "v.mp4", 30)).read_bytes())
    vops = [i for i in range(len(data) - 4) if data[i : i + 4] == b"\x00\x00\x01\xb6"]
    assert len(vops) == 30  # one MPEG-4 video object plane per frame
    for k in (10, 11):
        data[vops[k] : vops[k] + 4] = b"\xff\xff\xff\xff"  # frames 10 and 11 lose their header
    (tmp_path / "damaged.mp4").write_bytes(data)
    summary = stream(open_source(str(tmp_path / "damaged.mp4")), segmenter, StreamOptions())
    assert (summary.frames, summary.skipped) == (28, 2)


def test_a_cut_video_is_processed_to_the_cut(segmenter, tmp_path):
    data = faststart(write_video(tmp_path / "v.mp4", 30).read_bytes())
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    labels = tmp_path / "labels"
    summary = stream(open_source(str(tmp_path / "cut.mp4")), segmenter, StreamOptions(
        labels_dir=labels))  # fmt: skip
    assert 10 <= summary.frames < 30 and summary.frames + summary.skipped == 30
    assert len(list(labels.iterdir())) == summary.frames


def test_an_mp4_cut_before_its_index_is_a_clear_error(tmp_path):
    data = write_video(tmp_path / "v.mp4", 10).read_bytes()  # OpenCV writes moov last
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.mp4.*no index \(moov atom\)"):
        open_source(str(tmp_path / "cut.mp4"))


def test_a_resolution_change_mid_video(segmenter, tmp_path):
    """OpenCV cannot write two sizes into one file (it drops such frames), so the stream is two
    MPEG-TS segments written by OpenCV and concatenated, as a camera's recording segments are."""
    first = write_video(tmp_path / "a.ts", 8)
    second = write_video(tmp_path / "b.ts", 8, size=(48, 96), start=8)
    (tmp_path / "both.ts").write_bytes(first.read_bytes() + second.read_bytes())
    options = StreamOptions(out=tmp_path / "o.mp4", labels_dir=tmp_path / "labels")
    summary = stream(open_source(str(tmp_path / "both.ts")), segmenter, options)
    assert summary.frames == 16 and summary.skipped == 0
    written = read_video(tmp_path / "o.mp4")
    assert len(written) == 16 and {f.shape for f in written} == {(*SIZE, 3)}


def test_an_image_folder_with_other_sizes_gray_rgba_16bit_and_a_broken_file(segmenter, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    bgr = [cv2.cvtColor(drive_frame(i), cv2.COLOR_RGB2BGR) for i in range(5)]
    cv2.imwrite(str(folder / "f1.png"), bgr[0])
    cv2.imwrite(str(folder / "f2.jpg"), cv2.resize(bgr[1], (96, 40)))
    cv2.imwrite(str(folder / "f3.png"), cv2.cvtColor(bgr[2], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "f4.png"), cv2.cvtColor(bgr[3], cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(folder / "f5.png"), bgr[4].astype(np.uint16) * 257)
    (folder / "f6.png").write_bytes(b"not a png")
    (folder / "f10.png").write_bytes((folder / "f1.png").read_bytes())
    (folder / "notes.txt").write_text("ignored")
    options = StreamOptions(out=tmp_path / "o.avi", labels_dir=tmp_path / "labels", fps=5)
    summary = stream(open_source(str(folder)), segmenter, options)
    assert (summary.frames, summary.skipped, summary.resized) == (6, 1, 1)
    pngs = sorted((tmp_path / "labels").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in (0, 1, 2, 3, 4, 6)]
    assert cv2.imread(str(pngs[1]), cv2.IMREAD_UNCHANGED).shape == (40, 96)
    gray = cv2.imread(str(folder / "f3.png"), cv2.IMREAD_GRAYSCALE)[:, :, None].repeat(3, axis=2)
    np.testing.assert_array_equal(cv2.imread(str(pngs[2]), -1), segmenter(gray).labels)
    written = read_video(tmp_path / "o.avi")
    assert len(written) == 6 and {f.shape for f in written} == {(*SIZE, 3)}
    glob_summary = stream(open_source(str(folder / "f1*.png")), segmenter, StreamOptions())
    assert glob_summary.frames == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.mp4", "no such file"),
        ("ftp://host/x.mp4", "unknown scheme"),
        ("{empty}", "holds no images"),
    ],
)
def test_sources_that_cannot_be_opened(spec, message, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=message):
        open_source(spec.format(empty=tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# Live: a local HTTP MJPEG camera that drops its connection
# --------------------------------------------------------------------------------------------


class MjpegCamera(BaseHTTPRequestHandler):
    """Serves a burst of JPEG frames per connection, then hangs up, like a flaky IP camera."""

    frames_per_connection = 30
    connections = 0

    def do_GET(self) -> None:
        type(self).connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        for i in range(self.frames_per_connection):
            jpeg = cv2.imencode(".jpg", cv2.cvtColor(drive_frame(i), cv2.COLOR_RGB2BGR))[1]
            part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
            try:
                self.wfile.write(part % jpeg.size + jpeg.tobytes() + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                return

    def log_message(self, *args: object) -> None:
        pass


def test_a_live_source_keeps_the_newest_frame_and_reconnects(segmenter, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), MjpegCamera)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
        source = open_source(url, reconnect_timeout=5)
        assert source.live
        options = StreamOptions(max_frames=40, stats=tmp_path / "s.jsonl")
        summary = stream(source, segmenter, options)
    finally:
        server.shutdown()
        server.server_close()
    assert summary.frames == 40 and summary.reconnects >= 1 and not summary.lost
    assert 0 <= summary.decoded - summary.frames - summary.dropped <= 2  # the rest in flight
    indices = [
        json.loads(line)["index"] for line in (tmp_path / "s.jsonl").read_text().splitlines()
    ]
    assert indices == sorted(indices) and len(indices) == 40


class DroppingCamera(LiveStream):
    """A camera that delivers `frames` frames a tenth of a second apart, then drops and never
    comes back: its reader waits in LiveStream's reconnect loop until told to stop."""

    def __init__(self, frames: int, reconnect_timeout: float) -> None:
        self.left, self.opened, self.dropped, self.closed = frames, 0, False, False
        super().__init__(0, fps=FPS, reconnect_timeout=reconnect_timeout)

    def _open(self):
        self.opened += 1
        return self if self.opened == 1 else None  # it is its own capture: read, get, release

    def read(self):
        if self.left == 0:
            self.dropped = True
            return False, None
        self.left -= 1
        time.sleep(0.1)  # far slower than inference: no frame is replaced before it is taken
        return True, cv2.cvtColor(drive_frame(self.left), cv2.COLOR_RGB2BGR)

    def get(self, prop: int) -> float:
        return FPS

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        super().close()


def test_a_stream_that_ends_while_its_live_source_reconnects_closes_it_at_once(segmenter):
    source = DroppingCamera(frames=3, reconnect_timeout=30.0)
    start = time.monotonic()
    summary = stream(source, segmenter, StreamOptions(max_frames=3))
    assert summary.frames == 3 and source.dropped  # the reader went on to reconnect
    assert time.monotonic() - start < 3.0 and source.closed
    assert not [t for t in threading.enumerate() if t.name == "stream-reader"]


def test_newest_wins_channel_drops_the_oldest_and_close_drains():
    channel: Channel[int] = Channel(1, newest_wins=True)
    for i in range(5):
        assert channel.put(i)
    assert channel.dropped == 4 and channel.get() == 4
    bounded: Channel[int] = Channel(2)
    bounded.put(1)
    bounded.put(2)
    bounded.close()
    assert not bounded.put(3) and [bounded.get(), bounded.get(), bounded.get()] == [1, 2, None]


# --------------------------------------------------------------------------------------------
# Wrong options fail before any processing; SIGTERM finishes the MP4
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--out", "{file}/o.mp4", "--out"),
        ("--out", "{dir}/o.xyz", "unknown video container"),
        ("--labels-dir", "{file}", "--labels-dir"),
        ("--stats", "{dir}", "--stats"),
        ("--alpha", "1.5", "--alpha"),
    ],
)
def test_unusable_options_fail_before_processing(
    tiny_bundle, video, option, value, message, tmp_path
):
    (tmp_path / "file").write_text("a file, not a directory")
    value = value.format(file=tmp_path / "file", dir=tmp_path)
    never = tmp_path / "never"  # label PNGs would land here if any frame were processed
    labels = [] if option == "--labels-dir" else ["--labels-dir", str(never)]
    args = ["stream", str(video), "--bundle", str(tiny_bundle), *labels, option, value]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert not list(never.glob("*.png"))


def stream_until(tiny_bundle: Path, tmp_path: Path, out: Path, lines: int) -> subprocess.Popen:
    """`adapt-deploy stream` of a 300-frame 256x512 video in a subprocess, returned once the
    stats hold `lines` frames."""
    source = write_video(tmp_path / "long.mp4", 300, size=(256, 512))  # ~5 ms a frame at least
    stats, deadline = tmp_path / "s.jsonl", time.monotonic() + 60
    command = [sys.executable, "-m", "adapt_deploy.cli", "stream", str(source), "--bundle",
               str(tiny_bundle), "--out", str(out), "--stats", str(stats)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / f".s.partial-{process.pid}.jsonl"  # renamed to s.jsonl at the end
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    return process


@pytest.mark.skipif("NONE" not in cv2.getBuildInformation().split("GUI:")[1].split("\n")[0],
                    reason="this OpenCV has a GUI")  # fmt: skip
def test_show_without_a_gui_is_a_clear_error(video, segmenter):
    with pytest.raises(UserError, match="--show needs an OpenCV built with a GUI"):
        stream(open_source(str(video)), segmenter, StreamOptions(show=True))


def test_a_failing_window_leaves_an_existing_stats_file_alone(
    video, segmenter, tmp_path, monkeypatch
):
    def no_gui():
        raise OutputError("--show needs an OpenCV built with a GUI")

    monkeypatch.setattr(stream_outputs, "Window", no_gui)
    stats = tmp_path / "s.jsonl"
    stats.write_text('{"index": 0}\n')
    options = StreamOptions(show=True, stats=stats, out=tmp_path / "o.mkv", force=True)
    with pytest.raises(OutputError, match="--show"):
        stream(open_source(str(video)), segmenter, options)
    assert stats.read_text() == '{"index": 0}\n' and not (tmp_path / "o.mkv").exists()


def test_destinations_and_options_are_checked_once(tiny_bundle, video, tmp_path, monkeypatch):
    calls: list[tuple] = []
    check = pipeline.check_destinations
    monkeypatch.setattr(pipeline, "check_destinations", lambda *a: calls.append(a) or check(*a))
    options = StreamOptions(stats=tmp_path / "s.jsonl", max_frames=2, device="cpu")
    summary = pipeline.run_stream(str(video), tiny_bundle, options)
    assert summary.frames == 2 and len(calls) == 1


def test_stream_device_option(tiny_bundle, video, tmp_path):
    assert "--device" in CliRunner().invoke(app, ["stream", "--help"]).output
    args = ["stream", str(video), "--bundle", str(tiny_bundle), "--max-frames", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0 and "2 frames" in result.output, result.output
    command = [sys.executable, "-m", "adapt_deploy.cli", *args, "--device", "gpu"]
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --device: expected a GPU index (0, 1, ...), 'cuda', 'cuda:N' or 'cpu'; got 'gpu'"
    ]


def test_the_demo_streams_again_when_its_saved_summary_is_unusable(tmp_path):
    made_from = {"bundle": "b", "video": "v"}
    path = tmp_path / "summary.json"
    summary = StreamSummary("drive.mp4", False, frames=3)
    from dataclasses import asdict

    path.write_text(json.dumps({**asdict(summary), "made_from": made_from}))
    assert stream_demo._saved_summary(path, made_from) == summary
    assert stream_demo._saved_summary(path, {**made_from, "video": "w"}) is None
    for text in ('{"frames": 3, "made_from": 1', "[]", '"text"', "{}", '{"fps_x": 1}'):
        path.write_text(text.replace("1}", json.dumps(made_from) + "}"))
        assert stream_demo._saved_summary(path, made_from) is None, text
    renamed = {**asdict(summary), "frame_count": 3, "made_from": made_from}
    path.write_text(json.dumps(renamed))  # a summary of an older or newer version
    assert stream_demo._saved_summary(path, made_from) is None


def test_sigterm_finishes_the_mp4_with_the_frames_so_far(tiny_bundle, tmp_path):
    process = stream_until(tiny_bundle, tmp_path, tmp_path / "o.mp4", 5)
    os.kill(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stdout
    written = len((tmp_path / "s.jsonl").read_text().splitlines())
    assert 5 <= written < 300
    assert len(read_video(tmp_path / "o.mp4")) == written  # the index and every frame so far


def test_an_mkv_survives_sigkill_up_to_its_last_flushed_block(tiny_bundle, tmp_path):
    process = stream_until(tiny_bundle, tmp_path, tmp_path / "o.mkv", 60)
    process.kill()  # no handler runs: an MP4 would be unplayable now
    process.communicate(timeout=60)
    # Nothing was renamed into place: the partial files keep what was written under their
    # temporary names, and the mkv plays up to its last flushed block.
    assert not (tmp_path / "o.mkv").exists() and not (tmp_path / "s.jsonl").exists()
    written = len((tmp_path / f".s.partial-{process.pid}.jsonl").read_text().splitlines())
    assert 1 <= len(read_video(tmp_path / f".o.partial-{process.pid}.mkv")) <= written
