import os
import signal
import subprocess
import sys
import warnings

# The Triton kernels run on the CPU through Triton's interpreter in CI (there is no GPU there).
# This must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread per process is faster than two threads handing work back and forth
# (and much faster when the machine is busy). Set in the environment so the CLI subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def signal_handlers_restored(request):
    """Every test leaves Ctrl-C and SIGTERM handled as it found them: a handler left behind (a trainer's, which only
    records the signal) would swallow the interrupt a later test sends (test_export's Ctrl-C during the folder
    swap). One left behind is put back and named in a warning, so the test that leaked it can be found."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in before.items():
        if signal.getsignal(s) is not h:
            warnings.warn(f"{request.node.nodeid} left the {s.name} handler changed; restored")
            signal.signal(s, h)


# A full disk and a read-only target, for the tests of writing (test_atomic.py, test_export.py)

def mounted_tmpfs(mnt, size: str):
    """Mount a tmpfs of `size` (e.g. "64k") on the new folder `mnt` and yield it, or skip where mounting is not
    allowed (it needs root on Linux, as in CI); unmounted afterwards. For fixtures: `yield from`."""
    mnt.mkdir()
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                                 capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, or a skip where mounting is not allowed."""
    yield from mounted_tmpfs(tmp_path / "disk", "64k")


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root on Linux), else a folder without write permission (anyone else), else a skip."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if sys.platform == "linux" and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                                  capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    else:
        pytest.skip("no way to make a read-only folder here")
