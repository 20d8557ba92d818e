"""Checkpoints: one file, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


class _RecordingFile:
    """The file torch.save writes through, remembering the OSError of a failed write: torch replaces it with a
    RuntimeError that says only "unexpected pos", and the user needs to read "No space left on device"."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        """Write to the file; an OSError is kept in self.error and raised."""
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        """Flush the file."""
        self.file.flush()


def _write_and_sync(state: dict[str, Any], tmp: Path) -> None:
    """torch.save `state` into `tmp` and force it to the disk; a failed write raises its OSError."""
    with open(tmp, "wb") as file:
        out = _RecordingFile(file)
        try:
            torch.save(state, out)
        except RuntimeError as e:
            if out.error is None:
                raise
            raise out.error from e
        file.flush()
        os.fsync(file.fileno())  # on the disk before the rename makes it the checkpoint (else a power cut can
        # leave a renamed but empty file)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save `state` to `path` through a temporary file, fsync and a rename, so `path` is never half written.

    A write that fails (disk full, no permission, file too large) leaves the previous `path` as it was, removes the
    temporary file and raises CheckpointError naming the file and the system's reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_and_sync(state, tmp)
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is on the disk
        finally:
            os.close(directory)
    except OSError as e:
        kept = f"the previous {path.name} is unchanged" if path.is_file() else f"there was no earlier {path.name}"
        raise CheckpointError(f"{path}: could not write the checkpoint: {e.strerror or e} ({kept}; no partial file "
                              f"is left). Free space on that disk or make {path.parent} writable") from e
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain containers "
                              f"(weights_only=True), so it is not a checkpoint written by this project and could run "
                              f"code when unpickled. Detail: {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: a checkpoint of this project is a dict with 'model' and 'config' keys")
    return state


def checkpoint_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights to use from a loaded checkpoint: the EMA's (what training evaluated) when it has one."""
    return state["ema"]["module"] if state.get("ema") else state["model"]
