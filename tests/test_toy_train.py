"""The toy world's default, end to end: `python train.py` with no arguments (here cut to a few steps) trains
RPO on refs/toy with the shipped toy weights and the preset of its subject.json, writes the checkpoint,
labelled grids, a summary with the exact metrics of the kept checkpoint, and sample.py draws from it at the
model's own 32 px."""
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tinyrpo.toy.metrics import SubjectTruth, score_images

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def test_python_train_py_runs_the_toy_world_and_sample_py_draws_from_it(tmp_path):
    out = tmp_path / "toy"
    r = run("train.py", "--out", str(out), "--steps", "4", "--val-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no --subject: training on the toy world's subject (refs/toy)" in r.stdout
    assert "exact metrics of the kept checkpoint" in r.stdout

    config = json.loads((out / "config.json").read_text())
    meta = json.loads((ROOT / "refs" / "toy" / "subject.json").read_text())
    for key, value in meta["train_defaults"].items():  # the preset, where no flag overrode it
        if key not in ("steps", "val_every"):
            assert config.get(key, config.get("options", {}).get(key)) == value, key
    assert (config["weights"], config["resolution"]) == ("weights/toy/sd", 32)

    summary = json.loads((out / "summary.json").read_text())
    assert (out / "best.safetensors").exists() and (out / "report.html").exists()
    assert sorted(p.name for p in (out / "val").glob("step_*.png")) == ["step_00000.png", "step_00002.png", "step_00004.png"]
    exact = summary["chosen_exact"]
    assert 0 <= exact["identity"] <= 1 and 0 <= exact["fidelity"] <= 1

    # The same numbers from the validation pictures the log recorded, read again here.
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    chosen = [r for r in records if r.get("val") and r["step"] == summary["chosen_step"]]
    assert chosen and chosen[0]["exact"]["identity"] == exact["identity"]

    samples = tmp_path / "samples"
    r = run("sample.py", "--ckpt", str(out / "best.safetensors"), "--prompt", "a sks toy on a red background",
            "--images-per-prompt", "2", "--sample-steps", "10", "--out", str(samples), "--overwrite", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    pictures = sorted(p for p in samples.glob("*.png") if not p.name.endswith("-grid.png"))
    assert len(pictures) == 2 and all(Image.open(p).size == (32, 32) for p in pictures)
    scores = score_images([Image.open(p).convert("RGB") for p in pictures],
                          ["a sks toy on a red background"] * 2, SubjectTruth.from_json(meta["toy"]))
    assert 0 <= scores["identity"] <= 1


def test_lora_on_the_toy_world_warns_with_the_measured_numbers(tmp_path):
    """--lora on a toy subject says, before anything loads, that it learns almost nothing there (measured)."""
    import pytest
    import train
    from tinyrpo.errors import UserError
    with pytest.warns(UserWarning, match=r"--lora on the toy world learns almost nothing .*identity 0.25 flat"):
        with pytest.raises(UserError):  # missing weights: the warning came first, nothing was trained
            train.main(["--subject", str(ROOT / "refs" / "toy"), "--lora", "4", "--out", str(tmp_path / "run"),
                        "--weights", str(tmp_path / "missing")])
    assert not (tmp_path / "run").exists()
