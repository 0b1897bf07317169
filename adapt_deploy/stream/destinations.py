"""Where a stream may write: never onto what it reads, never over what exists without --force.

`check_destinations` runs before the first frame is read. It refuses an output (`--out`,
`--stats`, or a `--labels-dir` frame file) that is the same file as an input (also through a
symlink or a hard link) or that lies inside an input folder (the image folder, the bundle);
`--force` never lifts that. An output that already exists is refused unless `force`, in the
words export uses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from adapt_deploy.errors import UserError

FRAME_LABEL = re.compile(r"\d{6}\.png")  # what --labels-dir holds: {index:06d}.png


class OutputError(UserError):
    """An output path that cannot or must not be written."""


@dataclass(frozen=True)
class Inputs:
    """What a stream reads: files (a video, images) and folders (an image folder, the bundle)."""

    files: tuple[Path, ...] = ()
    folders: tuple[Path, ...] = ()

    def with_folder(self, folder: Path) -> Inputs:
        return Inputs(self.files, (*self.folders, Path(folder)))


def writable_directory(directory: Path, option: str) -> Path:
    """Create `directory` if needed and prove a file can be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".adapt-deploy-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{option} {directory}: not a writable directory ({exc})") from None
    return directory


def creatable_directory(directory: Path, option: str) -> None:
    """Fail now if `directory` cannot be written or made; creates nothing that is not there."""
    directory = Path(directory)
    if directory.is_dir():
        writable_directory(directory, option)
        return
    ancestor = directory.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {directory}: cannot be created ({ancestor} is not writable)")


def existing_frame_labels(directory: Path) -> list[Path]:
    """The frame label files (`{index:06d}.png`) already in `directory`."""
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if FRAME_LABEL.fullmatch(p.name))


def check_destinations(
    out: Path | None,
    labels_dir: Path | None,
    stats: Path | None,
    inputs: Inputs | None = None,
    force: bool = False,
) -> None:
    """OutputError naming the option and path when an output would destroy an input, or an
    existing file without `force`."""
    inputs = inputs or Inputs()
    files = {"--out": out, "--stats": stats}
    for option, path in files.items():
        if path is not None:
            _refuse_input(option, Path(path), inputs)
            if Path(path).exists() and not Path(path).is_dir() and not force:
                raise OutputError(f"{option} {path} already exists; pass --force to replace it")
    if out is not None and stats is not None and _same(Path(out), Path(stats)):
        raise OutputError(f"--out and --stats name the same file {out}; give each its own")
    if labels_dir is not None:
        _check_labels_dir(Path(labels_dir), inputs, force)


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or one inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _refuse_inside_inputs(option: str, path: Path, inputs: Inputs) -> None:
    """OutputError when `path` is or lies inside one of the input folders."""
    for folder in inputs.folders:
        if _inside(path, folder):
            raise OutputError(
                f"{option} {path} lies inside the input folder {folder}; write outputs elsewhere"
            )


def _refuse_input(option: str, path: Path, inputs: Inputs) -> None:
    for source in inputs.files:
        if _same(path, source):
            raise OutputError(
                f"{option} {path} is the stream's input {source}; writing it would destroy the "
                "input: choose another file"
            )
    _refuse_inside_inputs(option, path, inputs)


def _check_labels_dir(directory: Path, inputs: Inputs, force: bool) -> None:
    _refuse_inside_inputs("--labels-dir", directory, inputs)
    for source in inputs.files:
        if FRAME_LABEL.fullmatch(source.name) and _same(source.parent, directory):
            raise OutputError(
                f"--labels-dir {directory} holds the stream's input {source}, which a frame "
                "label would overwrite; write the labels elsewhere"
            )
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"--labels-dir {directory}: exists and is not a directory")
    existing = existing_frame_labels(directory)
    if existing and not force:
        raise OutputError(
            f"--labels-dir {directory} already holds {len(existing)} frame label files "
            f"({existing[0].name}, ...); pass --force to replace them"
        )
