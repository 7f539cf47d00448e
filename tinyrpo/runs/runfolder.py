"""The run folder: what train.py writes, and the rules that keep it from being corrupted.

    runs/<subject>/
        config.json      every setting, resolved; written once the inputs are checked and the models loaded
        .lock            held (flock) by the one process training into the folder
        log.jsonl        one JSON record per step and per validation
        last.pt          the resumable state, every --save-every steps, at the end and on Ctrl-C / SIGTERM
        best.*           the chosen checkpoint
        ...              each method's cached images (negatives/, class_images/), val/, summary.json

Rules (each one a bug that was seen):
- A command that fails before training starts writes nothing: no folder, no config.json.
- A folder that holds a run is only ever continued with --resume, and only with settings that keep the
  run meaningful (`RESUMABLE` lists the ones that may change); anything else is refused with the list of
  differences.
- One process at a time: the lock is an flock on `.lock`, which the kernel drops when the process dies,
  so a crash never leaves a stale lock behind (the file stays, unlocked, and the next run takes it).
- Every file is replaced atomically (temporary file, fsync, rename): a crash leaves the old version or
  the new one, never half of one.
"""
import json
import os
import shlex
from pathlib import Path

from tinyrpo.errors import UserError
from tinyrpo.runs.atomic import atomic_write_bytes, atomic_write_json, write_error

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock then only guards against a live process (see acquire)
    fcntl = None

# Settings a resumed run may change: they decide how long it runs and how it reports, not what it learns.
RESUMABLE = ("steps", "patience", "log_every", "save_every", "gen_batch_size", "compile", "device", "log_with",
             "threads")


def read_json(path, what: str = "the file"):
    """A run's JSON file (config.json, summary.json, compare.json); one sentence for a missing or broken one."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path} ({e}); is it a complete file?") from None


def config_differences(old: dict, new: dict, allowed=RESUMABLE) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a run's config.json and the settings of a resume, as text."""
    refused, ok = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (ok if key in allowed else refused).append(line)
    return refused, ok


class RunLock:
    """An exclusive lock on a run folder for the life of this process (or until release())."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd = None

    def held_by_other(self) -> str | None:
        """The holder's description if another live process holds the lock, else None. Writes nothing."""
        if not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if fcntl is None:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.path.read_text().strip() or "another process"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.path.read_text().strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to finish "
                                f"or train into another --out") from None
        try:  # who holds it, for the message of a second process; the flock is the lock, this is only its label
            os.ftruncate(fd, 0)
            os.write(fd, f"train.py, pid {os.getpid()}".encode())
        except OSError:  # a full disk: the lock holds all the same
            pass
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class JsonlLog:
    """log.jsonl: appended record by record; on resume, cut back to the step the run resumes from."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, records: list[dict]) -> None:
        """Append whole lines or nothing: a write cut short (a full disk) is cut back off the file, so the log
        never holds a torn line, and the failure is a WriteError."""
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                os.ftruncate(fd, size)
                raise write_error(self.path, e) from None
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        """The records; a line that is not whole JSON (cut by a crash mid-append) is left out."""
        if not self.path.exists():
            return []
        out = []
        for ln in self.path.read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue
        return [r for r in out if isinstance(r, dict)]

    def truncate(self, step: int) -> None:
        """Drop the records written after `step` (they will be redone); a validation at `step` is kept."""
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def reset(self) -> None:
        atomic_write_bytes(self.path, b"")


def peek_last(path: Path) -> dict:
    """last.pt's step and counters without reading its weights (memory-mapped: cheap even for SD's 10 GB)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: state[k] for k in ("step", "bad_vals")}
    except Exception as e:  # a truncated or foreign file: say so instead of a traceback
        raise UserError(f"cannot resume from {path} ({e.__class__.__name__}: {e}); delete it to start the "
                        f"run over from its cached images") from None


class RunFolder:
    """One run's folder, with the rules of the module docstring."""

    def __init__(self, path, resume: bool):
        self.path, self.resume = Path(path), resume
        self.lock = RunLock(self.path)

    def holds_run(self) -> bool:
        return (self.path / "config.json").exists() or (self.path / "last.pt").exists()

    def check(self, settings: dict) -> None:
        """Refuse, writing nothing, a folder this run cannot use; `settings` are those known before loading."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a folder")
        if self.holds_run() and not self.resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or --out DIR to start a new one")
        if self.resume and not self.holds_run():
            raise UserError(f"--resume: {out} holds no run (no config.json); start it without --resume")
        if self.resume:  # refuse early what can be told before loading anything (resolved values: in start)
            self.refuse_changes(settings)
        holder = self.lock.held_by_other()
        if holder:
            raise UserError(f"{out} is in use by {holder}; wait for it to finish or train into another --out")
        probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK) or not probe.is_dir():
            raise UserError(f"cannot write to --out {out}; choose a folder you can write to")

    def start(self, settings: dict) -> dict:
        """Lock the folder; for --resume, refuse settings that would invalidate the run; write config.json."""
        self.lock.acquire()
        if self.resume:
            allowed = self.refuse_changes(settings)
            if allowed:
                print("resuming with changed settings: " + "; ".join(allowed))
        atomic_write_json(self.path / "config.json", settings)
        return settings

    def refuse_changes(self, new: dict) -> list[str]:
        """Raise if `new` changes a setting of the run that --resume may not change; -> the allowed changes."""
        old = read_json(self.path / "config.json", "the run's settings") if (self.path / "config.json").exists() else {}
        old.pop("out", None)  # a run folder may be moved or copied
        refused, allowed = config_differences({k: v for k, v in old.items() if k in new},
                                              {k: v for k, v in new.items() if k in old})
        if refused:
            raise UserError(f"--resume with settings that differ from the run's ({'; '.join(refused)}); "
                            f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may "
                            f"change on resume: start a new run with --out DIR instead")
        return allowed

    def check_resume(self, steps: int, patience: int | None) -> str | None:
        """-> the message of a finished run, which a resume must leave as it is (None: there is work left); refuse
        --steps below the step last.pt holds; say so when there is no last.pt (training starts at step 0)."""
        last = self.path / "last.pt"
        if not last.exists():
            logged = [r["step"] for r in JsonlLog(self.path / "log.jsonl").records() if not r.get("val")]
            redone = f"; the {max(logged)} steps it logged are redone" if logged else ""
            print(f"resuming {self.path}: it has no last.pt yet (it stopped before its first save), so training "
                  f"starts at step 0 with the images it has cached{redone}")
            return None
        state = peek_last(last)
        done = state["step"]
        if steps < done:
            raise UserError(f"--steps {steps} is fewer than the {done} steps {self.path} has trained (last.pt); "
                            f"pass --steps {done} or more to continue it, or start a new run with --out DIR")
        summary = read_json(self.path / "summary.json", "the run's summary") if (self.path / "summary.json").exists() else {}
        stopped = patience is not None and state.get("bad_vals", 0) >= patience
        if summary.get("steps_run") == done and (done >= steps or stopped):  # summary.json: written last
            more = "a larger --patience" if stopped else f"--steps N above {done}"
            return (f"{self.path} is finished at step {done}{' (stopped early)' if stopped else ''}; nothing to do "
                    f"(pass {more} with --resume to train further)")
        return None

    def resume_command(self) -> str:
        return shlex.join(["python", "train.py", "--out", str(self.path), "--resume"])

    def release(self) -> None:
        self.lock.release()
