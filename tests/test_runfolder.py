"""The run folder: refused resumes, failed commands that write nothing, the lock, checkpoint cadence, Ctrl-C."""
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from tests.test_train import ROOT, base_args, make_subject, models, run_cli  # noqa: F401  (models: fixture)
from tests.conftest import mounted_tmpfs
from tinyrpo import trainer as trainer_module
from tinyrpo.runs.runfolder import RunLock


def snapshot(folder):
    """Every file of a folder with its content hash (the lock file's presence aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    subject = make_subject(tmp / "subject")
    out = tmp / "run"
    assert train.main(base_args(models, subject, out, "--steps", "2", "--val-every", "2")) == 0
    return subject, out


@pytest.mark.parametrize("change", [["--resolution", "16"], ["--lr", "1e-4"], ["--beta", "2.0"],
                                    ["--weights", "other"], ["--method", "rpo", "--seed", "3"]])
def test_resume_with_invalidating_settings_is_refused(models, finished_run, change):
    subject, out = finished_run
    before = snapshot(out)
    args = base_args(models, subject, out, "--steps", "4", "--val-every", "2", "--resume")
    for k in range(0, len(change), 2):
        if change[k] in args:
            args[args.index(change[k]) + 1] = change[k + 1]
        else:
            args += change[k:k + 2]
    r = run_cli(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    flag = change[-2].lstrip("-").replace("-", "_")
    assert "differ from the run's" in r.stderr and flag in r.stderr, r.stderr
    assert snapshot(out) == before


def test_failed_commands_write_nothing(models, finished_run, tmp_path):
    subject, out = finished_run
    before = snapshot(out)
    # a finished run without --resume; a resume with missing weights; a bad seed
    for args in (base_args(models, subject, out, "--steps", "4"),
                 base_args(models, subject, out, "--steps", "4", "--resume", "--reward-model", str(tmp_path / "x")),
                 base_args(models, subject, out, "--seed", "99999999999999999999", "--resume")):
        r = run_cli(args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert snapshot(out) == before
    # a new run whose weights are missing creates no folder
    new = tmp_path / "new" / "run"
    r = run_cli(base_args(models, subject, new, "--weights", str(tmp_path / "nope")))
    assert r.returncode == 2 and not new.exists() and not new.parent.exists()


def test_seed_out_of_range(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    r = run_cli(base_args(models, subject, tmp_path / "run", "--seed", "99999999999999999999"))
    assert r.returncode == 2 and "--seed must be between" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_extends_a_run_from_its_own_settings(models, finished_run, tmp_path):
    """--out RUN --resume alone takes every setting from config.json; --steps may change."""
    subject, out = finished_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    assert train.main(["--out", str(copy), "--resume", "--steps", "4"]) == 0
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg["steps"] == 4 and cfg["resolution"] == 32
    steps = [r["step"] for r in map(json.loads, (copy / "log.jsonl").read_text().splitlines()) if not r.get("val")]
    assert steps == [1, 2, 3, 4]


def test_second_process_is_refused_while_the_first_holds_the_lock(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()
    try:
        r = run_cli(base_args(models, subject, out, "--steps", "1"))
        assert r.returncode == 2 and "in use by" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (out / "config.json").exists()
    finally:
        lock.release()
    # the lock file left behind (as after a crash) is not held by anyone: the next run takes it
    assert (out / ".lock").exists()
    assert train.main(base_args(models, subject, out, "--steps", "1")) == 0


def test_last_pt_cadence(models, tmp_path, monkeypatch):
    """last.pt every --save-every steps and at the end, not at every validation."""
    saved = []
    real = trainer_module.atomic_torch_save
    monkeypatch.setattr(trainer_module, "atomic_torch_save", lambda obj, path: (saved.append(obj["step"]), real(obj, path))[1])
    subject = make_subject(tmp_path / "subject")
    out = tmp_path / "run"
    assert train.main(base_args(models, subject, out, "--steps", "5", "--val-every", "1", "--save-every", "2")) == 0
    assert saved == [2, 4, 5]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5


def test_ctrl_c_saves_and_resume_matches_uninterrupted(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    steps = ["--steps", "30", "--val-every", "30", "--save-every", "100"]
    full = tmp_path / "full"
    assert train.main(base_args(models, subject, full, *steps)) == 0

    part = tmp_path / "my dög run"  # a path that needs quoting in the printed command
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *base_args(models, subject, part, *steps)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = part / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.exists() and any(not json.loads(x).get("val") for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "Continue with: " in line, err
    command = shlex.split(line.split("Continue with: ")[1])
    assert command[:2] == ["python", "train.py"] and command[command.index("--out") + 1] == str(part)
    step = torch.load(part / "last.pt", weights_only=True)["step"]
    assert 1 <= step < 30
    assert train.main(command[2:]) == 0
    a = torch.load(full / "last.pt", weights_only=True)["unet"]
    b = torch.load(part / "last.pt", weights_only=True)["unet"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- issue 19

def copy_run(out, to):
    subprocess.run(["cp", "-r", str(out), str(to)], check=True)
    return to


def test_finished_run_resumed_with_nothing_to_do_changes_nothing(models, finished_run, tmp_path, capsys):
    subject, out = finished_run
    run = copy_run(out, tmp_path / "run")
    before = snapshot(run)
    for extra in ([], ["--steps", "2"], ["--log-every", "5"]):
        assert train.main(["--out", str(run), "--resume", *extra]) == 0
        said = capsys.readouterr().out.strip().splitlines()
        assert said == [f"{run} is finished at step 2; nothing to do (pass --steps N above 2 with --resume to "
                        f"train further)"], said
        assert snapshot(run) == before  # summary.json (its phase times), report.html, config.json: untouched


def test_resume_with_steps_below_the_runs_step_is_refused(models, finished_run, tmp_path):
    subject, out = finished_run
    run = copy_run(out, tmp_path / "run")
    before = snapshot(run)
    r = run_cli(["--out", str(run), "--resume", "--steps", "1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --steps 1 is fewer than the 2 steps {run} has trained (last.pt); pass --steps 2 or more to "
        f"continue it, or start a new run with --out DIR"], r.stderr
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert snapshot(run) == before


def test_resume_without_last_pt_says_it_starts_over(models, finished_run, tmp_path, capsys):
    subject, out = finished_run
    run = copy_run(out, tmp_path / "run")
    (run / "last.pt").unlink()
    (run / "summary.json").unlink()
    assert train.main(["--out", str(run), "--resume"]) == 0
    said = capsys.readouterr().out
    assert (f"resuming {run}: it has no last.pt yet (it stopped before its first save), so training starts at "
            f"step 0 with the images it has cached; the 2 steps it logged are redone") in said
    steps = [(r["step"], bool(r.get("val"))) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert steps == [(0, True), (1, False), (2, False), (2, True)]
    a = torch.load(out / "last.pt", weights_only=True)["unet"]
    b = torch.load(run / "last.pt", weights_only=True)["unet"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def full_disk_for(monkeypatch, name: str, module=trainer_module, attr="atomic_torch_save"):
    """Make the trainer's writes of files called `name` fail as a full disk does: half written, then ENOSPC."""
    import errno
    from tinyrpo.runs import atomic
    real = getattr(module, attr)

    def write(*a, **kw):
        path = next(x for x in a if isinstance(x, (str, os.PathLike)))
        if os.path.basename(path) != name:
            return real(*a, **kw)

        def half_then_full(tmp):
            tmp.write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return atomic.atomic_write(path, half_then_full)
    monkeypatch.setattr(module, attr, write)


def log_steps(run):
    return [(r["step"], bool(r.get("val"))) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_full_disk_at_the_first_save_and_at_the_resume_after_it(models, finished_run, tmp_path, monkeypatch):
    """One line with what to do; the folder stays resumable, and once there is space the run ends as if the disk had
    never been full."""
    subject, out = finished_run
    run = tmp_path / "run"
    args = base_args(models, subject, run, "--steps", "2", "--val-every", "2", "--save-every", "1")
    with monkeypatch.context() as m:
        full_disk_for(m, "last.pt")
        with pytest.raises(trainer_module.UserError) as e:
            train.main(args)
        command = shlex.join(["python", "train.py", "--out", str(run), "--resume"])
        assert str(e.value) == (f"cannot write {run / 'last.pt'}: no space left on the device; free some space, then "
                                f"continue the run (no step is saved yet, the images generated so far are kept) with: "
                                f"{command}")
        assert not (run / "last.pt").exists() and [p.name for p in run.iterdir() if p.name.startswith(".last")] == []
        assert log_steps(run) == [(0, True), (1, False)]
        with pytest.raises(trainer_module.UserError, match="no space left on the device; free some space, then "
                                                           "continue the run"):
            train.main(["--out", str(run), "--resume"])
        assert not (run / "last.pt").exists()
    assert train.main(["--out", str(run), "--resume"]) == 0
    assert log_steps(run) == [(0, True), (1, False), (2, False), (2, True)]
    a = torch.load(out / "last.pt", weights_only=True)["unet"]
    b = torch.load(run / "last.pt", weights_only=True)["unet"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_at_the_summary_then_resume_finishes_the_run(models, finished_run, tmp_path, monkeypatch):
    """last.pt holds the final step but summary.json could not be written: --resume writes it (and the report),
    with the phase times of the first process kept, and trains nothing."""
    subject, out = finished_run
    run = tmp_path / "run"
    args = base_args(models, subject, run, "--steps", "2", "--val-every", "2")
    with monkeypatch.context() as m:
        full_disk_for(m, "summary.json", attr="atomic_write_json")
        with pytest.raises(trainer_module.UserError, match=r"summary.json: no space left .* \(last.pt holds step 2\)"):
            train.main(args)
    assert not (run / "summary.json").exists()
    first = torch.load(run / "last.pt", weights_only=True)["seconds"]
    assert first["train"] > 0 and first["total"] >= first["train"]
    trained = []
    monkeypatch.setattr(trainer_module, "optimizer_step", lambda *a, **kw: trained.append(1))
    assert train.main(["--out", str(run), "--resume"]) == 0
    assert trained == [] and log_steps(run) == [(0, True), (1, False), (2, False), (2, True)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_run"] == 2 and summary["chosen_step"] == json.loads((out / "summary.json").read_text())[
        "chosen_step"]
    assert summary["seconds"]["train"] == pytest.approx(first["train"])  # not this process's 0 s
    assert summary["seconds"]["total"] > first["total"]
    assert "finished: 2 of 2 steps" in (run / "report.html").read_text()


def test_log_append_cut_short_leaves_no_torn_line(tmp_path, monkeypatch):
    import errno
    from tinyrpo.runs.atomic import WriteError
    from tinyrpo.runs.runfolder import JsonlLog
    log = JsonlLog(tmp_path / "log.jsonl")
    log.write([{"step": 1, "loss": 0.5}])
    before = (tmp_path / "log.jsonl").read_bytes()
    real = os.write

    def half(fd, data):
        real(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", half)
    with pytest.raises(WriteError, match=r"log.jsonl: no space left"):
        log.write([{"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}])
    monkeypatch.undo()
    assert (tmp_path / "log.jsonl").read_bytes() == before
    log.write([{"step": 2, "loss": 0.25}])
    assert log.records() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_a_torn_last_line_from_a_crash_does_not_stop_a_resume(tmp_path):
    from tinyrpo.runs.runfolder import JsonlLog
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "val": true}\n{"step": 3, "lo')
    log = JsonlLog(tmp_path / "log.jsonl")
    log.truncate(2)
    assert log.records() == [{"step": 1, "loss": 0.5}, {"step": 2, "val": True}]


def test_report_that_cannot_be_written_warns_on_stderr(tmp_path, monkeypatch, capsys):
    import errno
    from types import SimpleNamespace
    from tinyrpo.runs.atomic import WriteError

    def full(run_dir):
        raise WriteError(tmp_path / "report.html", errno.ENOSPC)
    monkeypatch.setattr(trainer_module, "write_report", full)
    trainer_module.Trainer.write_report(SimpleNamespace(out=tmp_path))
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"warning: could not write {tmp_path / 'report.html'}") and "no space" in err


def rig_rewards(monkeypatch, rewards: dict):
    """Validation reports rewards[step] as its reward (the images are still made and scored)."""
    validate = trainer_module.Trainer.validate
    monkeypatch.setattr(trainer_module.Trainer, "validate",
                        lambda self, step: validate(self, step) | {"reward": rewards[step]})


def test_patience_stops_on_time_and_select_best_keeps_the_argmax(models, finished_run, tmp_path, monkeypatch, capsys):
    """--patience 2: the count of validations without improvement resets on an improvement, and the run stops at
    the second one in a row; --select best keeps the argmax of the logged validation rewards, not the last."""
    from tinyrpo.formats.checkpoint import load_checkpoint
    subject, _ = finished_run
    run = tmp_path / "run"
    # step:     0 best, 1 worse (1), 2 best (reset), 3 worse (1), 4 worse (2): stop at 4
    rig_rewards(monkeypatch, {0: 0.50, 1: 0.40, 2: 0.60, 3: 0.55, 4: 0.58, 5: 0.70, 6: 0.1, 7: 0.1, 8: 0.1})
    assert train.main(base_args(models, subject, run, "--steps", "8", "--val-every", "1", "--patience", "2",
                                "--select", "best")) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["reward"] for r in records if r.get("val")}
    assert sorted(vals) == [0, 1, 2, 3, 4] and max(r["step"] for r in records) == 4
    argmax = max(vals, key=vals.get)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps_run"] == 4
    assert summary["chosen_step"] == summary["best_step"] == argmax == 2
    assert load_checkpoint(run / "best.safetensors")[1]["step"] == 2
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    capsys.readouterr()
    before = snapshot(run)
    assert train.main(["--out", str(run), "--resume", "--steps", "10"]) == 0  # more steps: patience still ran out
    assert capsys.readouterr().out.strip() == (f"{run} is finished at step 4 (stopped early); nothing to do (pass a "
                                               f"larger --patience with --resume to train further)")
    assert snapshot(run) == before
    # its summary.json lost (a full disk at the very end): the resume writes it again and trains nothing
    (run / "summary.json").unlink()
    log = (run / "log.jsonl").read_text()
    assert train.main(["--out", str(run), "--resume"]) == 0
    assert (run / "log.jsonl").read_text() == log
    again = json.loads((run / "summary.json").read_text())
    assert again["stopped_early"] is True and again["steps_run"] == 4 and again["chosen_step"] == 2


def test_resume_between_saves_cuts_the_log_back(models, finished_run, tmp_path, monkeypatch):
    """A run that dies after step 4 with last.pt at step 3 resumes at 3: the log's records past 3 are dropped and
    redone, once each, the same."""
    subject, _ = finished_run
    run = tmp_path / "run"
    validate = trainer_module.Trainer.validate

    def crash_at_4(self, step):
        if step == 4:
            raise RuntimeError("killed")
        return validate(self, step)
    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "validate", crash_at_4)
        with pytest.raises(RuntimeError, match="killed"):
            train.main(base_args(models, subject, run, "--steps", "5", "--val-every", "2", "--save-every", "3"))
    crashed = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("val"))) for r in crashed][-2:] == [(3, False), (4, False)]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3
    seen = []
    load_last = trainer_module.Trainer.load_last

    def look(self):  # the log as the resumed run starts to train: nothing past step 3
        start = load_last(self)
        seen.append(start)
        return start
    monkeypatch.setattr(trainer_module.Trainer, "load_last", look)
    at_start = []
    monkeypatch.setattr(trainer_module, "tqdm", _WatchLog(trainer_module.tqdm, run, at_start))
    assert train.main(["--out", str(run), "--resume"]) == 0
    assert seen == [3] and at_start and max(r["step"] for r in at_start[0]) == 3
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("val"))) for r in log] == [
        (0, True), (1, False), (2, False), (2, True), (3, False), (4, False), (4, True), (5, False), (5, True)]
    assert next(r for r in log if r["step"] == 4) == next(r for r in crashed if r["step"] == 4)  # redone exactly


class _WatchLog:
    """tqdm, recording log.jsonl's records when the training bar is made (after the resume cut the log back)."""

    def __init__(self, tqdm, run, into):
        self.tqdm, self.run, self.into = tqdm, run, into

    def __call__(self, *a, **kw):
        if kw.get("desc") == "training":
            self.into.append([json.loads(x) for x in (self.run / "log.jsonl").read_text().splitlines()])
        return self.tqdm(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tqdm, name)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (root on Linux), else a skip: the tiny model's last.pt (weights and AdamW's moments, 14 MB)
    does not fit, its cached images and config do."""
    yield from mounted_tmpfs(tmp_path / "disk", "8m")


def test_real_full_disk_then_space_freed_resumes(models, finished_run, small_disk):
    subject, out = finished_run
    run = small_disk / "run"
    args = base_args(models, subject, run, "--steps", "2", "--val-every", "2", "--save-every", "1", "--select", "last")
    command = shlex.join(["python", "train.py", "--out", str(run), "--resume"])
    for attempt in (args, ["--out", str(run), "--resume"]):  # the run, then a resume on the still full disk
        r = run_cli(attempt)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == (  # after the progress bars, one line
            f"error: cannot write {run / 'last.pt'}: no space left on the device; free some space, then continue the "
            f"run (no step is saved yet, the images generated so far are kept) with: {command}"), r.stderr
        assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = run_cli(["--out", str(run), "--resume"])
    assert r.returncode == 0, r.stderr
    assert log_steps(run) == [(0, True), (1, False), (2, False), (2, True)]
    a = torch.load(out / "last.pt", weights_only=True)["unet"]
    b = torch.load(run / "last.pt", weights_only=True)["unet"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_at_config_json_leaves_no_folder(models, finished_run, tmp_path, monkeypatch):
    """A new run whose config.json cannot be written never began: no folder is left (not even its .lock), and the
    message says to run the command again, not to --resume."""
    from tinyrpo.runs import runfolder
    subject, _ = finished_run
    out = tmp_path / "new" / "run"
    full_disk_for(monkeypatch, "config.json", module=runfolder, attr="atomic_write_json")
    with pytest.raises(trainer_module.UserError) as e:
        train.main(base_args(models, subject, out, "--steps", "1"))
    assert str(e.value) == (f"cannot write {out / 'config.json'}: no space left on the device; free some space and "
                            f"run the command again")
    assert not (tmp_path / "new").exists()
