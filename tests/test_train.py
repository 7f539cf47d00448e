"""End-to-end: train.py on tiny random weights and synthetic photos, then sample.py with its checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tinyrpo.formats.checkpoint import load_checkpoint
from tests.fixtures import make_tiny_clip, make_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
RES = 32  # tiny SD: VAE factor 2 -> 16x16 latents


def make_subject(folder: Path, n=3, size=64, seed=0) -> Path:
    """Synthetic 'photos': a coloured disc on a textured background, moved a little in each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        yy, xx = np.mgrid[:size, :size]
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        cx, cy = size // 2 + rng.integers(-6, 6), size // 2 + rng.integers(-6, 6)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (size // 4) ** 2] = (200, 60 + 20 * k, 40)
        Image.fromarray(img).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return make_tiny_sd(d / "sd", layout="diffusers"), make_tiny_clip(d / "clip")


def base_args(models, subject, out, *extra):
    sd, clip = models
    return ["--subject", str(subject), "--class-noun", "toy", "--weights", str(sd), "--reward-model", str(clip),
            "--out", str(out), "--resolution", str(RES), "--images-per-prompt", "1", "--sample-steps", "2",
            "--val-images-per-prompt", "1", "--gen-batch-size", "8", "--device", "cpu", "--lr", "1e-3",
            "--log-every", "1", *extra]


def test_end_to_end(models, tmp_path, monkeypatch):
    from tinyrpo.trainer import Trainer
    # Tiny random networks give a flat, noisy reward; nudge it up with the step so that the best checkpoint is a
    # trained checkpoint (and sample.py with it must differ from the base). The argmax logic is unchanged.
    validate = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self, step: (lambda v: v | {"reward": v["reward"] + 0.1 * step})(
        validate(self, step)))
    subject = make_subject(tmp_path / "subject")
    out = tmp_path / "run"
    # 64-px synthetic photos for a 64-px model: no small-photo warning (tests/test_data.py has the one that is)
    assert train.main(base_args(models, subject, out, "--steps", "4", "--val-every", "2",
                                "--log-with", "tensorboard")) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 4" in (out / "report.html").read_text()
    for f in ["config.json", "log.jsonl", "best.safetensors", "last.pt", "summary.json", "rewards.json",
              "negatives/index.json", "val/step_00000.png", "val/step_00002.png", "val/step_00004.png"]:
        assert (out / f).exists(), f
    assert len(list((out / "negatives").glob("*.png"))) == 8  # 8 object prompts x 1 image
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if not r.get("val")]
    vals = [r for r in log if r.get("val")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "l_sim", "l_pref", "delta", "label"} <= r.keys() for r in steps)
    assert [v["step"] for v in vals] == [0, 2, 4]
    # the best checkpoint is the argmax of the validation reward
    best = max(vals, key=lambda v: v["reward"])
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["step"] == best["step"] and meta["reward"] == pytest.approx(best["reward"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == best["step"]
    assert {"negatives", "train", "validation"} <= summary["seconds"].keys()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class_noun"] == "toy" and len(cfg["train_prompts"]) == 8

    # sample.py with the fine-tuned U-Net differs from the base model with the same seed
    import sample
    assert meta["step"] == 4
    common = ["--prompt", "a sks toy on the beach", "--sample-steps", "2", "--images-per-prompt", "1", "--height", str(RES),
              "--width", str(RES), "--device", "cpu", "--seed", "3"]
    sample.main([*common, "--weights", str(models[0]), "--out", str(tmp_path / "base")])
    sample.main([*common, "--ckpt", str(out / "best.safetensors"), "--out", str(tmp_path / "tuned")])
    a = sorted((tmp_path / "base").rglob("*-00.png"))
    b = sorted((tmp_path / "tuned").rglob("*-00.png"))
    assert len(a) == len(b) == 1
    assert not np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(b[0])))


def test_resume_matches_uninterrupted(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    full = tmp_path / "full"
    train.main(base_args(models, subject, full, "--steps", "4", "--val-every", "2"))
    # "interrupt" after step 2 by running only 2 steps, then resume to 4
    part = tmp_path / "part"
    train.main(base_args(models, subject, part, "--steps", "2", "--val-every", "2"))
    train.main(base_args(models, subject, part, "--steps", "4", "--val-every", "2", "--resume"))
    a = torch.load(full / "last.pt", weights_only=True)["unet"]
    b = torch.load(part / "last.pt", weights_only=True)["unet"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]


def run_cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "empty", "no_image", "unknown_class", "steps0", "lambda",
                                  "no_weights", "no_reward", "unwritable", "exists", "resume_nothing",
                                  "guidance_inf", "beta_nan"])
def test_bad_input(models, tmp_path, case):
    subject = make_subject(tmp_path / "subject", n=2)
    out = tmp_path / "run"
    args = base_args(models, subject, out, "--steps", "1")
    expect = {"missing": "does not exist", "empty": "is empty", "no_image": "no readable image",
              "unknown_class": "--class-noun", "steps0": "--steps", "lambda": "--lambda-val",
              "no_weights": "tinyrpo.download", "no_reward": "tinyrpo.download", "unwritable": "cannot write",
              "exists": "--resume", "resume_nothing": "holds no run",
              "guidance_inf": "--guidance must be a finite number", "beta_nan": "--beta must be a finite number"}[case]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "no_image":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "a.jpg").write_bytes(b"not a jpeg")
        (tmp_path / "junk" / "notes.txt").write_text("hello")
        args[1] = str(tmp_path / "junk")
    elif case == "unknown_class":
        i = args.index("--class-noun")
        del args[i:i + 2]
    elif case == "steps0":
        args[args.index("--steps") + 1] = "0"
    elif case == "lambda":
        args += ["--lambda-val", "1.5"]
    elif case == "no_weights":
        args[args.index("--weights") + 1] = str(tmp_path / "weights" / "sd15")
    elif case == "no_reward":
        args[args.index("--reward-model") + 1] = str(tmp_path / "weights" / "clip")
    elif case == "unwritable":
        (tmp_path / "file").write_text("")
        args[args.index("--out") + 1] = str(tmp_path / "file" / "run")
    elif case == "exists":
        out.mkdir()
        (out / "last.pt").write_bytes(b"x")
    elif case == "resume_nothing":
        args.append("--resume")
    elif case == "guidance_inf":
        args += ["--guidance", "inf"]
    elif case == "beta_nan":
        args += ["--beta", "nan"]
    r = run_cli(args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert expect in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_corrupt_image_among_good_ones_is_skipped(tmp_path):
    from tinyrpo.data import load_subject_images
    subject = make_subject(tmp_path / "s", n=2, size=300)
    (subject / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(UserWarning, match="broken.jpg"):
        images = load_subject_images(subject, 64)
    assert len(images) == 2 and images[0].size == (64, 64)


def test_image_modes_and_exif(tmp_path):
    from tinyrpo.data import load_subject_images
    d = tmp_path / "modes"
    d.mkdir()
    Image.new("RGBA", (300, 400), (255, 0, 0, 0)).save(d / "a.png")   # transparent -> white
    Image.new("L", (300, 300), 128).save(d / "b.png")
    Image.new("CMYK", (300, 300), (0, 255, 0, 0)).save(d / "c.jpg")
    im = Image.new("RGB", (400, 300), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90°: the loaded photo must come out portrait before the crop
    im.save(d / "d.jpg", exif=exif)
    images = load_subject_images(d, 256)
    assert all(i.mode == "RGB" and i.size == (256, 256) for i in images)
    assert images[0].getpixel((10, 10)) == (255, 255, 255)


def test_subject_file_names_models_prompts_and_defaults(models, tmp_path):
    """A subject.json (the toy world's) names its models, resolution and preset; given flags still win."""
    import shutil
    subject = tmp_path / "toy"
    shutil.copytree(ROOT / "refs" / "toy", subject)
    meta = json.loads((subject / "subject.json").read_text())
    meta["weights"] = {"sd": str(models[0]), "clip": str(models[1])}
    meta["train_defaults"] = {"lr": 2e-3, "val_every": 2, "sample_steps": 2, "beta": 3.0}
    (subject / "subject.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    assert train.main(["--subject", str(subject), "--out", str(out), "--steps", "2", "--images-per-prompt", "1",
                       "--val-images-per-prompt", "1", "--device", "cpu", "--sample-steps", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights"] == str(models[0]) and cfg["reward_model"] == str(models[1])
    assert cfg["resolution"] == 32 and cfg["lr"] == 2e-3 and cfg["beta"] == 3.0 and cfg["val_every"] == 2
    assert cfg["sample_steps"] == 1  # given on the command line: wins over the file
    assert cfg["train_prompts"] == [t.format("sks", "toy") for t in meta["train_prompts"]]
    vals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("val")]
    assert [v["step"] for v in vals] == [0, 2]
    assert all({"identity", "fidelity"} <= v["exact"].keys() for v in vals)
    # the exact metrics are those of the validation images, each read against its own prompt
    from tinyrpo.evaluation.grids import grid_cells
    from tinyrpo.toy.metrics import score_images, subject_truth
    cells = grid_cells(Image.open(out / "val" / "step_00002.png").convert("RGB"), 8, 1, (32, 32))
    exact = score_images(cells, cfg["train_prompts"], subject_truth(meta))
    assert vals[-1]["exact"]["identity"] == pytest.approx(exact["identity"])
    assert vals[-1]["exact"]["fidelity"] == pytest.approx(exact["fidelity"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen_exact"] == next(v["exact"] for v in vals if v["step"] == summary["chosen_step"])


def test_no_subject_means_the_toy_world(tmp_path):
    r = run_cli(["--out", str(tmp_path / "run"), "--weights", str(tmp_path / "missing")])
    assert "no --subject: training on the toy world's subject (refs/toy)" in r.stdout
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("change, expect", [
    ({"train_defaults": {"steps": "800"}}, 'train_defaults.steps must be a whole number (got "800")'),
    ({"train_defaults": {"lr": True}}, "train_defaults.lr must be a number (got true)"),
    ({"train_defaults": {"beta": [0.1]}}, "train_defaults.beta must be a number (got [0.1])"),
    ({"train_defaults": {"stpes": 800}}, "unknown key train_defaults.stpes; did you mean train_defaults.steps?"),
    ({"train_defaults": {"lamda_val": 0.3}}, "unknown key train_defaults.lamda_val; did you mean train_defaults.lambda_val?"),
    ({"trian_prompts": ["a {0} {1}"]}, "unknown key trian_prompts; did you mean train_prompts?"),
    ({"weights": {"sdd": "weights/toy/sd"}}, "unknown key weights.sdd; did you mean weights.sd?"),
    ({"resolution": "32"}, 'resolution must be a whole number (got "32")'),
    ({"train_defaults": ["lr", 1e-4]}, "train_defaults must be an object {...}"),
])
def test_subject_file_typos_and_wrong_types_are_refused(models, tmp_path, change, expect):
    """subject.json is read the way flags are: a typo or a value of the wrong type is one line naming the key."""
    import shutil
    subject = tmp_path / "toy"
    shutil.copytree(ROOT / "refs" / "toy", subject)
    meta = json.loads((subject / "subject.json").read_text())
    meta["weights"] = {"sd": str(models[0]), "clip": str(models[1])}
    for k, v in change.items():
        meta[k] = meta[k] | v if isinstance(v, dict) and isinstance(meta.get(k), dict) else v
    (subject / "subject.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    r = run_cli(["--subject", str(subject), "--out", str(out), "--steps", "1", "--device", "cpu"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {subject / 'subject.json'}: {expect}"), r.stderr
    assert not out.exists()


def test_lora_rank_above_the_adapted_layers_is_refused(models, tmp_path):
    """A rank above every adapted layer's min(in, out) is refused before anything is written; the largest useful
    rank (read off the model here) is accepted."""
    from tinyrpo.trainer import check_lora_rank
    from tinyrpo.formats.weights import load_sd
    unet = load_sd(models[0]).unet
    names = ("to_q", "to_k", "to_v", "to_out.0")
    top = max(min(m.in_features, m.out_features) for n, m in unet.named_modules()
              if type(m) is torch.nn.Linear and n.endswith(tuple("." + t for t in names)))
    check_lora_rank(unet, top, names)
    with pytest.raises(train_errors().UserError, match=f"--lora {top + 1} is more than the adapted layers' largest "
                                                      f"min\\(in, out\\), {top} "):
        check_lora_rank(unet, top + 1, names)
    subject = make_subject(tmp_path / "subject")
    r = run_cli(base_args(models, subject, tmp_path / "run", "--lora", "100000"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"use --lora {top} or less" in r.stderr and not (tmp_path / "run").exists()


def train_errors():
    from tinyrpo import errors
    return errors
