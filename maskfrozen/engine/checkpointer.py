"""A DetectionCheckpointer whose files are never half-written.

Each checkpoint is written to a temporary file in the same directory and renamed into
place (atomic on POSIX); the ``last_checkpoint`` tag is updated the same way, only after
the checkpoint itself is complete. An interrupted save therefore leaves the previous
checkpoint and tag untouched.

Files get the mode of any other new file (``0666 & ~umask``, 0644 under umask 022). A
temporary file is named ``.tmp-<host>-<pid>-<token>-<name>``: a process killed in the
middle of a write (``kill -9``) leaves it behind, and the next ``AtomicCheckpointer`` on
that directory removes it once its writer is gone (see ``remove_stale_temporaries``).

A checkpoint file that cannot be read (empty, truncated, not a checkpoint at all) is a
``CheckpointFormatError`` naming the file and what was expected, and, when it is the run's own
last checkpoint (``--resume``), how to resume from the previous one instead."""
import functools
import logging
import os
import glob
import re
import secrets
import socket
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# ours: .tmp-<host>-<pid>-<8 hex>-<name>; before: tempfile.mkstemp's .tmp-<8 chars><name>
_TMP_NAME = re.compile(r"^\.tmp-(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}-(?P<name>.+)$")
_LEGACY_TMP_NAME = re.compile(r"^\.tmp-[a-z0-9_]{8}(?P<name>.+\.pth|last_checkpoint)$")
# A writer whose pid cannot be checked (another host, an old name, a reused pid) is taken as
# gone when its file has not been written to for this long.
STALE_AFTER_SECONDS = 3600.0


@functools.lru_cache(maxsize=None)
def _host_tag() -> str:
    """Where this process's pid means something: the host name and, on Linux, the pid
    namespace (containers on one host), in ``\\w`` characters (no ``-``, the separator)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "0"
    return (re.sub(r"\W", "_", socket.gethostname())[:60] or "host") + "_" + namespace


def _temporary_path(path: str) -> str:
    """``.tmp-<host>-<pid>-<token>-<name>`` next to ``path`` (the name's tail only: a file
    name has at most 255 bytes)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}-{name[-100:]}")


def atomic_write(path: str, write_fn: Callable[[BinaryIO], Any]) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    The file is created with mode 0666 filtered by the umask, like ``open(path, "wb")``.
    On any error (or interrupt) the temporary file is removed and ``path`` is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(name: str, mtime: float, now: float) -> bool:
    """Whether ``name`` is a temporary file of ``atomic_write`` whose writer is gone."""
    ours = _TMP_NAME.match(name)
    if ours is None and _LEGACY_TMP_NAME.match(name) is None:
        return False
    if ours is not None and ours["host"] == _host_tag() and not _pid_alive(int(ours["pid"])):
        return True
    return now - mtime > STALE_AFTER_SECONDS


def remove_stale_temporaries(directory: str, now: Optional[float] = None) -> List[str]:
    """Delete the temporary files that interrupted ``atomic_write`` calls left in ``directory``.

    Only names of ``atomic_write``'s own pattern are considered, and only when their writer
    is gone: its pid (on this host) is dead, or the file has not changed for
    ``STALE_AFTER_SECONDS``. A concurrent writer's live file is kept. Returns the removed paths."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and _is_stale(name, os.path.getmtime(path), now):
                os.remove(path)
                removed.append(path)
        except FileNotFoundError:  # removed meanwhile (another process cleaning, or the rename)
            continue
        except OSError as e:
            logger.warning("could not remove the stale temporary file %s: %s", path, e)
    return removed


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic ``save`` and ``tag_last_checkpoint``.

    On creation, the process that saves (``save_to_disk``) removes the temporary files that
    interrupted saves left in ``save_dir`` (``remove_stale_temporaries``)."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any) -> None:
        super().__init__(model, save_dir, **kwargs)
        if self.save_dir and self.save_to_disk:
            for path in remove_stale_temporaries(self.save_dir):
                self.logger.info("Removed %s, left by an interrupted checkpoint write", path)

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

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """detectron2's reading of a checkpoint file; any failure is a CheckpointFormatError
        naming the file, what was expected and (for the run's last checkpoint) what to do."""
        # imported here: this module stays loadable on its own (a test runs atomic_write in a bare child process)
        from ..checkpoint.loading import CheckpointFormatError, header_problem, load_error_cause

        pickle_file = filename.endswith(".pkl")
        expected = ("a detectron2 / Caffe2 model pickle" if pickle_file
                    else "a checkpoint written by torch.save (e.g. tools/train_net.py's model_final.pth)")
        problem = header_problem(filename) if not pickle_file or os.path.getsize(filename) == 0 else None
        if problem is None:
            try:
                return super()._load_file(filename)
            except Exception as e:  # EOFError, UnpicklingError, RuntimeError (truncated zip), ...
                raise CheckpointFormatError(
                    f"cannot read checkpoint {filename!r} ({load_error_cause(e)}): the file is damaged or not "
                    f"{expected}.{self._last_checkpoint_advice(filename)}") from e
        raise CheckpointFormatError(f"{problem}; expected {expected}.{self._last_checkpoint_advice(filename)}")

    def _last_checkpoint_advice(self, filename: str) -> str:
        """For the checkpoint that ``last_checkpoint`` names (a ``--resume``): resume from the
        previous checkpoint of the folder, or delete this one; otherwise ''."""
        if not (self.save_dir and self.has_checkpoint()):
            return ""
        try:
            if not os.path.samefile(filename, self.get_checkpoint_file()):
                return ""
        except OSError:
            return ""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        others = [p for p in glob.glob(os.path.join(self.save_dir, "model_*.pth")) if not os.path.samefile(p, filename)]
        if not others:
            return (f" It is the last checkpoint of {self.save_dir} ({tag}) and no earlier one exists there: delete "
                    f"it and {tag} to train from the start")
        previous = os.path.basename(max(others, key=os.path.getmtime))
        return (f" It is the last checkpoint of {self.save_dir} ({tag}): to resume from the previous one, write "
                f"{previous!r} into {tag} and run with --resume again; or delete {filename} (and {tag}) to train "
                "from the start")
