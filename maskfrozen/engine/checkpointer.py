"""A DetectionCheckpointer whose files are never half-written.

Each checkpoint is written to a temporary file in the same directory and renamed into
place (atomic on POSIX); the ``last_checkpoint`` tag is updated the same way, only after
the checkpoint itself is complete. An interrupted save therefore leaves the previous
checkpoint and tag untouched."""
import os
import tempfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic ``save`` and ``tag_last_checkpoint``."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag_file, lambda f: f.write(last_filename_basename.encode()))
