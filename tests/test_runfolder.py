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
from tinyrpo import trainer as trainer_module
from tinyrpo.runfolder import RunLock


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
