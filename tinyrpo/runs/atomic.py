"""Writing files so that nothing is lost and nothing is left half-written.

Every file tinyrpo writes goes through `atomic_write`: the bytes go to a temporary file beside the target,
are fsynced, and only then is the file renamed over the target (and the folder fsynced, so the rename itself
survives a crash). A reader — sample.py on a checkpoint, a browser refreshing report.html, a resumed run —
sees the old file or the complete new one, never a partial one.

A write that fails because of the machine, not the program (a full disk, a read-only folder, no permission)
removes its temporary file, leaves the old file as it was, and raises `WriteError`: a UserError whose one
sentence names the file, the reason and what to do. Libraries report a full disk in their own words (torch's
zip writer says "unexpected pos", safetensors "os error 28"), so torch writes through a Python file object,
whose OSError carries the errno, and other messages are read for the OS's own wording.
"""
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from tinyrpo.errors import REASONS, UserError, write_failure

# How libraries that do their own I/O (safetensors' Rust writer, C extensions) word the same errors.
WORDING = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
           "read-only file system": errno.EROFS, "os error 30": errno.EROFS, "permission denied": errno.EACCES,
           "os error 13": errno.EACCES}


class WriteError(UserError):
    """A file could not be written for a reason outside the program (disk full, read-only, permission)."""

    def __init__(self, path, code: int):
        self.path, self.errno = Path(path), code
        super().__init__(write_failure(path, code))


def machine_errno(e: BaseException | None) -> int | None:
    """The errno of a write failure the user must fix (REASONS), from an OSError or a library's message, here
    or in the exception it was raised during (torch's zip writer fails again on close: "unexpected pos")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in REASONS:
            return e.errno
        text = str(e).lower()
        if code := next((code for words, code in WORDING.items() if words in text), None):
            return code
        e = e.__cause__ or e.__context__
    return None


def write_error(path, e: BaseException) -> BaseException:
    """WriteError for a failure the user must fix; the exception itself for anything else (a bug)."""
    if isinstance(e, WriteError):
        return e
    code = machine_errno(e)
    return WriteError(path, code) if code is not None else e


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary path beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); the files we write are ordinary files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the new name points at them
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        err = write_error(path, e)
        if err is e:
            raise
        raise err from None
    fsync_dir(path.parent)  # make the rename itself durable
    return path


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_with(fn) -> Callable[[Path], None]:
    """write(tmp) for a function that takes a file object (so an OSError keeps its errno)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            fn(f)
    return write


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, _write_with(lambda f: f.write(data)))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj, path) -> Path:
    """torch.save(obj, path), atomically."""
    import torch
    return atomic_write(path, _write_with(lambda f: torch.save(obj, f)))


def atomic_save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_save_image(image, path, **kwargs) -> Path:
    """PIL's Image.save, atomically; the format comes from the target's suffix (the temporary name has none)."""
    from PIL import Image
    fmt = Image.registered_extensions()[Path(path).suffix.lower()]
    return atomic_write(path, _write_with(lambda f: image.save(f, format=fmt, **kwargs)))
