"""tinyrpo.runs.atomic: a write that fails leaves the old file and no temporary, and a full disk, a read-only folder
or a missing permission becomes one sentence (WriteError) instead of a library's traceback.

The full disk is real where the tests may mount a 64 KiB tmpfs (root on Linux, as in CI; fixtures small_disk and
read_only_folder in conftest.py), else the test skips; test_full_disk_patched fakes it on any machine."""
import errno
import os

import pytest
import torch
from PIL import Image

from tinyrpo.errors import run_cli
from tinyrpo.runs import atomic
from tinyrpo.runs.atomic import (WriteError, atomic_save_image, atomic_save_safetensors, atomic_torch_save,
                                 atomic_write_json, atomic_write_text)

BIG = {"w": torch.arange(200_000, dtype=torch.float32)}  # 800 kB: more than the small disk holds


WRITERS = {
    "torch": lambda path: atomic_torch_save(BIG, path),
    "safetensors": lambda path: atomic_save_safetensors(BIG, path),
    "text": lambda path: atomic_write_text(path, "x" * 800_000),
    "image": lambda path: atomic_save_image(Image.effect_noise((512, 512), 100).convert("RGB"), path),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_full_disk(small_disk, kind):
    path = small_disk / ("old.png" if kind == "image" else "old.bin")
    path.write_bytes(b"the old file")
    with pytest.raises(WriteError, match="no space left") as e:
        WRITERS[kind](path)
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    assert sorted(p.name for p in small_disk.iterdir()) == [path.name]  # no temporary left behind
    assert path.read_bytes() == b"the old file"


def test_full_disk_patched(tmp_path, monkeypatch):
    """The same on any machine: the write itself raises ENOSPC halfway."""
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"old": 1})

    def half_then_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"{\"ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match="free some space"):
        atomic.atomic_write(path, half_then_full)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert path.read_text() == '{\n  "old": 1\n}\n'


def test_read_only_folder(read_only_folder):
    with pytest.raises(WriteError, match="read-only|permission denied"):
        atomic_write_text(read_only_folder / "a.txt", "x")
    assert list(read_only_folder.iterdir()) == []


def test_read_only_file_system(tmp_path, monkeypatch):
    """EROFS (a read-only mount) as the OS and as a library word it."""
    def refuse(tmp):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    with pytest.raises(WriteError, match="read-only"):
        atomic.atomic_write(tmp_path / "a", refuse)

    def rust_words(tmp):
        raise RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)")
    with pytest.raises(WriteError, match="read-only"):
        atomic.atomic_write(tmp_path / "a", rust_words)
    assert list(tmp_path.iterdir()) == []


def test_bugs_stay_tracebacks(tmp_path):
    """Anything that is not the machine's fault is raised as it is."""
    def bug(tmp):
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        atomic.atomic_write(tmp_path / "a", bug)
    assert list(tmp_path.iterdir()) == []


def test_run_cli_one_line(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/val.png")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write /runs/x/val.png: no space left" in err
