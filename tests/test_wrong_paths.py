"""A model given to the wrong flag: one line that says what it is and which flag takes it, exit code 2, and the
advice works (the path it names loads through the flag it names)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sample
from tests.fixtures import make_tiny_clip, make_tiny_dino, make_tiny_sd
from tinyrpo import evaluate
from tinyrpo.errors import run_cli
from tinyrpo.formats.checkpoint import BEST, load_checkpoint, save_checkpoint
from tinyrpo.formats.lora_files import read_lora
from tinyrpo.formats.weights import load_clip, load_dino, load_sd

ROOT = Path(__file__).resolve().parents[1]
LOADERS = {"--weights": load_sd, "--reward-model": load_clip, "--eval-clip": load_clip, "--dino": load_dino,
           "--ckpt": load_checkpoint}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = make_tiny_sd(root / "sd")
    single = make_tiny_sd(root / "single", layout="single")
    base = load_sd(sd)
    meta = {"base": str(sd), "base_fingerprint": base.fingerprint, "token": "sks", "class_noun": "toy", "live": False}
    ckpt = save_checkpoint(root / "run" / BEST, base.unet.state_dict(), meta)
    lora = root / "style_lora.safetensors"  # a kohya LoRA of one layer
    layer = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.ones(2, 64), f"{layer}.lora_up.weight": torch.ones(64, 2)}, lora)
    LOADERS["--lora"] = lambda path: read_lora(path, base)
    subject = root / "refs" / "toy"
    subject.mkdir(parents=True)
    from tests.test_data import photos
    photos(subject, 3)
    return {"sd": sd, "single": single, "single_folder": single.parent, "unet": sd / "unet",
            "text_encoder": sd / "text_encoder", "clip": make_tiny_clip(root / "clip"),
            "clip_file": root / "clip" / "model.safetensors", "dino": make_tiny_dino(root / "dino"),
            "dino_pth": make_tiny_dino(root / "dino_orig", layout="original"), "ckpt": ckpt,
            "lora": lora, "subject": subject, "out": root / "out"}


def cli_error(capsys, main, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def follow_advice(err: str):
    """The message's `pass PATH as --FLAG`, `pass it as --FLAG` or `pass --FLAG PATH`: PATH must load as --FLAG
    takes it."""
    m = (re.search(r"pass (?:the whole folder )?(\S+) as (--[\w-]+)", err)
         or re.search(r"pass (--[\w-]+) (\S+)", err))
    assert m, err
    path, flag = (m[1], m[2]) if m[2].startswith("--") else (m[2], m[1])
    if path == "it":  # the path the message starts with
        path = err.removeprefix("error: ").split(" is ")[0]
    LOADERS[flag](shlex.split(path)[0])


def sample_args(paths, **over):
    args = {"--weights": paths["sd"], "--prompt": "a dog", "--sample-steps": 1, "--images-per-prompt": 1, "--height": 32, "--width": 32,
            "--out": paths["out"], "--device": "cpu"}
    args.update(over)
    return [x for k, v in args.items() for x in (k, v)] + ["--no-progress"]


def evaluate_args(paths, **over):
    args = {"--subject": paths["subject"], "--class-noun": "toy", "--weights": paths["sd"], "--eval-clip": paths["clip"],
            "--dino": paths["dino"], "--resolution": 32, "--sample-steps": 1, "--images-per-prompt": 1,
            "--out": paths["out"], "--device": "cpu"}
    args.update(over)
    return [x for k, v in args.items() for x in (k, v)] + ["--no-progress"]


@pytest.mark.parametrize("given, flag, says", [
    ("clip", "--weights", ["CLIP model folder", "--reward-model", "--eval-clip"]),
    ("clip_file", "--weights", ["CLIP model", "--reward-model"]),
    ("dino", "--weights", ["ViT folder", "--dino"]),
    ("dino_pth", "--weights", ["ViT", "--dino"]),
    ("ckpt", "--weights", ["checkpoint written by train.py", "--ckpt"]),
    ("lora", "--weights", ["is a LoRA", "--lora"]),
    ("lora", "--ckpt", ["is a LoRA", "--lora"]),
    ("unet", "--weights", ["unet/ of a diffusers SD folder"]),
    ("text_encoder", "--weights", ["text_encoder/ of a diffusers SD folder"]),
    ("single_folder", "--weights", ["single-file checkpoint tiny-sd-v1.safetensors"]),
    ("sd", "--ckpt", ["Stable Diffusion v1 diffusers folder, not a checkpoint", "--weights"]),
    ("single", "--ckpt", ["Stable Diffusion v1 single-file checkpoint, not a checkpoint", "--weights"]),
    ("clip", "--ckpt", ["CLIP model folder", "--reward-model"]),
])
def test_sample_names_the_right_flag(paths, capsys, given, flag, says):
    err = cli_error(capsys, sample.main, sample_args(paths, **{flag: paths[given]}))
    for s in says:
        assert s in err, err
    assert "instead" not in err  # the old advice "pass that file instead", which then failed
    follow_advice(err)
    assert not paths["out"].exists()


@pytest.mark.parametrize("given, flag, says", [
    ("sd", "--eval-clip", ["Stable Diffusion v1 diffusers folder, not a CLIP model", "--weights"]),
    ("single", "--eval-clip", ["Stable Diffusion v1 single-file checkpoint", "--weights"]),
    ("dino", "--eval-clip", ["ViT folder", "--dino"]),
    ("dino_pth", "--eval-clip", ["ViT", "--dino"]),
    ("ckpt", "--eval-clip", ["checkpoint written by train.py", "--ckpt"]),
    ("text_encoder", "--eval-clip", ["text_encoder/ of a diffusers SD folder", "--weights"]),
    ("clip", "--dino", ["CLIP model folder, not a DINO ViT", "--eval-clip"]),
    ("clip_file", "--dino", ["CLIP model, not a DINO ViT", "--eval-clip"]),
    ("sd", "--dino", ["Stable Diffusion v1 diffusers folder", "--weights"]),
    ("sd", "--ckpt", ["Stable Diffusion v1 diffusers folder, not a checkpoint", "--weights"]),
    ("clip", "--weights", ["CLIP model folder", "--eval-clip"]),
])
def test_evaluate_names_the_right_flag(paths, capsys, given, flag, says):
    err = cli_error(capsys, evaluate.main, evaluate_args(paths, **{flag: paths[given]}))
    for s in says:
        assert s in err, err
    follow_advice(err)


def test_sd_folder_as_reward_model_through_train_py(paths, tmp_path):
    """The observed case, as a user runs it."""
    r = subprocess.run([sys.executable, "train.py", "--subject", str(paths["subject"]), "--class-noun", "toy",
                        "--weights", str(paths["sd"]), "--reward-model", str(paths["sd"]), "--out",
                        str(tmp_path / "run"), "--resolution", "32", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "is a Stable Diffusion v1 diffusers folder, not a CLIP model" in lines[0]
    assert "--weights" in lines[0] and "clip-l14" in lines[0]


def test_clip_folder_as_weights_through_sample_py(paths, tmp_path):
    """The observed case: the advice was "pass that file instead", which then failed."""
    r = subprocess.run([sys.executable, "sample.py", *map(str, sample_args(paths, **{"--weights": paths["clip"]}))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "is a CLIP model folder, not Stable Diffusion v1 weights" in lines[0] and "--reward-model" in lines[0]


@torch.no_grad()
def test_the_right_paths_still_load(paths):
    """The checks must not refuse what each flag takes."""
    load_sd(paths["sd"]), load_sd(paths["single"]), load_clip(paths["clip"]), load_clip(paths["clip_file"])
    load_dino(paths["dino"]), load_dino(paths["dino_pth"]), load_checkpoint(paths["ckpt"])
    read_lora(paths["lora"], load_sd(paths["sd"]))
