"""sample.py and tinyrpo.pipeline against diffusers' StableDiffusionPipeline (the oracle), pixel for pixel,
plus the checkpoint format and sample.py's handling of bad input. Tiny SD v1 weights, fp32, CPU.

The oracle reads the tiny model from its diffusers folder; tinyrpo reads the same weights from that folder
and from the single-file (CompVis) layout. Images are compared as the PNGs sample.py wrote, read back.
"""
import contextlib
import copy
import errno
import hashlib
import json
import os
import subprocess
import threading
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import safetensors.torch
from safetensors import safe_open
from safetensors.torch import save_file

import sample
from tests.fixtures import make_tiny_sd
from tests.util import parse_a1111
from tinyrpo.errors import UserError, run_cli
from tinyrpo.formats.checkpoint import BEST, FORMAT, apply_checkpoint, load_checkpoint, save_checkpoint
from tinyrpo.formats.infotext import lora_hash, model_hash
from tinyrpo.formats.weights import load_sd
from tinyrpo.lora import add_lora, lora_config, lora_state_dict, set_lora_scale
from tinyrpo.pipeline import generate, to_pil, to_uint8

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a sks dog on the beach", "an oil painting of a cat"]
NEG = "blurry, low quality"
N, STEPS, SEED, SIZE = 2, 4, 3, 32  # the tiny VAE downsamples by 2: 32 px -> 16x16 latents


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny SD as a diffusers folder and as a single file (same weights), and another base model."""
    root = tmp_path_factory.mktemp("weights")
    return {"diffusers": make_tiny_sd(root / "sd", "diffusers"),
            "single": make_tiny_sd(root / "single", "single"),
            "other": make_tiny_sd(root / "other", "single", seed=1)}


def run_sample(*args) -> list[Path]:
    return sample.main([*map(str, args), "--no-progress"])


@lru_cache(maxsize=1)
def diffusers_pipeline(folder):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=None)
def diffusers_images(folder, prompt, scheduler="ddim", eta=0.0, seed=SEED, n=N, guidance=7.5) -> np.ndarray:
    """(n, H, W, 3) uint8 from diffusers' StableDiffusionPipeline reading the diffusers folder."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers_pipeline(folder)
    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[scheduler]
    pipe.scheduler = cls.from_pretrained(folder, subfolder="scheduler")
    out = pipe(prompt, negative_prompt=NEG, num_images_per_prompt=n, num_inference_steps=STEPS, eta=eta,
               guidance_scale=guidance, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed))
    return np.stack([np.asarray(im) for im in out.images])


def read_pngs(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def assert_same_pixels(got: np.ndarray, want: np.ndarray):
    """At most 2/255 per channel on 99.9% of the values: the same image up to float rounding."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, {(diff > 2).mean():.2%} of values > 2"
    assert want.std() > 10  # a real image, not a flat one that any bug would match


def images_of(paths, prompt_index):
    return [p for p in paths if p.name.startswith(f"p{prompt_index:02d}-") and not p.stem.endswith("grid")]


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_ddim_matches_diffusers(weights, layout, tmp_path):
    """Deterministic DDIM (eta 0), two prompts with a negative prompt: prompt p uses seed + p."""
    paths = run_sample("--weights", weights[layout], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                       "--negative-prompt", NEG, "--scheduler", "ddim", "--eta", 0, "--sample-steps", STEPS, "--seed", SEED,
                       "--images-per-prompt", N, "--height", SIZE, "--width", SIZE, "--out", tmp_path, "--device", "cpu")
    for p, prompt in enumerate(PROMPTS):
        want = diffusers_images(weights["diffusers"], prompt, seed=SEED + p)
        assert_same_pixels(read_pngs(images_of(paths, p)), want)


@pytest.mark.parametrize("scheduler,eta", [("ddpm", 0.0), ("ddim", 0.6)])
def test_stochastic_samplers_match_diffusers(weights, scheduler, eta, tmp_path):
    """DDPM and DDIM with eta > 0 draw fresh noise every step. The draws line up with diffusers': the same
    CPU generator per prompt, the initial latents of all n images first, then one (n, C, h, w) draw per step."""
    paths = run_sample("--weights", weights["single"], "--prompt", PROMPTS[0], "--negative-prompt", NEG,
                       "--scheduler", scheduler, "--eta", eta, "--sample-steps", STEPS, "--seed", SEED, "--images-per-prompt", N,
                       "--height", SIZE, "--width", SIZE, "--out", tmp_path, "--device", "cpu")
    want = diffusers_images(weights["diffusers"], PROMPTS[0], scheduler=scheduler, eta=eta)
    assert_same_pixels(read_pngs(images_of(paths, 0)), want)


def test_subprocess_run_matches_diffusers(weights, tmp_path):
    """The script as a user runs it, on the single file."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--weights", str(weights["single"]), "--prompt", PROMPTS[1],
           "--negative-prompt", NEG, "--sample-steps", str(STEPS), "--seed", str(SEED), "--images-per-prompt", str(N), "--height", str(SIZE),
           "--width", str(SIZE), "--out", str(tmp_path), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = [Path(line) for line in r.stdout.split()]
    assert all(p.is_file() for p in paths) and len(paths) == N + 1  # n images and a grid
    assert_same_pixels(read_pngs(images_of(paths, 0)), diffusers_images(weights["diffusers"], PROMPTS[1]))


def test_batch_size_does_not_change_images(weights):
    sd = load_sd(weights["diffusers"])
    kw = dict(negative_prompt=NEG, n=3, steps=2, seed=SEED, height=SIZE, width=SIZE, progress=False,
              scheduler="ddpm")
    full, records = generate(sd, PROMPTS, **kw)
    one, _ = generate(sd, PROMPTS, batch_size=1, **kw)
    assert full.shape == (6, 3, SIZE, SIZE) and full.dtype == torch.float32
    assert 0 <= full.min() and full.max() <= 1
    assert (full - one).abs().max() < 1e-4  # float rounding of batched kernels only (1/255 = 4e-3)
    assert [(r.prompt, r.seed, r.index) for r in records] == [(p, SEED + i, k) for i, p in enumerate(PROMPTS)
                                                             for k in range(3)]
    # A prompt alone, with its own seed, gives the same images as inside the batch.
    alone, _ = generate(sd, PROMPTS[1], **{**kw, "seed": SEED + 1})
    assert (alone - full[3:]).abs().max() < 1e-4
    # With deterministic DDIM, image k does not depend on n either (the first rows of a randn do not).
    ddim = {**kw, "scheduler": "ddim", "steps": 1}
    one_image, _ = generate(sd, PROMPTS[0], **{**ddim, "n": 1})
    assert (one_image - generate(sd, PROMPTS[0], **ddim)[0][:1]).abs().max() < 1e-4


def test_uint8_conversion_is_diffusers():
    diffusers = pytest.importorskip("diffusers")
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # rounding ties and the top value
    want = diffusers.image_processor.VaeImageProcessor.numpy_to_pil(x.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(to_uint8(x), np.stack([np.asarray(im) for im in want]))
    assert np.array_equal(np.asarray(to_pil(x)[1]), to_uint8(x)[1])


# ---------------------------------------------------------------------------------------------------------
# Outputs


def test_png_metadata_and_no_overwrite(weights, tmp_path):
    args = ["--weights", weights["single"], "--prompt", "a dog", "--negative-prompt", NEG, "--sample-steps", 1, "--images-per-prompt", 2,
            "--height", SIZE, "--width", SIZE, "--seed", 11, "--out", tmp_path, "--scheduler", "ddpm"]
    first = run_sample(*args)
    before = {p: p.read_bytes() for p in first}
    second = run_sample(*args)
    assert {p.parent.name for p in first} == {"0000"} and {p.parent.name for p in second} == {"0001"}
    assert all(p.read_bytes() == b for p, b in before.items())  # the first run's files are untouched
    assert (tmp_path / "0000" / "settings.json").is_file()

    text = Image.open(first[1]).text
    assert parse_a1111(text["parameters"]) == {  # AUTOMATIC1111's format, parsed by A1111's rules
        "Prompt": "a dog", "Negative prompt": NEG, "Steps": "1", "Sampler": "DDPM", "CFG scale": "7.5", "Seed": "11",
        "Size": f"{SIZE}x{SIZE}", "Model hash": hashlib.sha256(weights["single"].read_bytes()).hexdigest()[:10],
        "Model": "tiny-sd-v1"}
    assert text["prompt"] == "a dog" and text["negative_prompt"] == NEG and text["seed"] == "11"
    assert text["index"] == "1" and text["steps"] == "1" and text["scheduler"] == "ddpm"
    assert text["guidance"] == "7.5" and text["eta"] == "0.0"
    assert text["weights"] == str(weights["single"]) and text["ckpt"] == ""

    third = run_sample(*args, "--overwrite")  # straight into --out
    assert {p.parent for p in third} == {tmp_path}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def finetuned(sd, scale=0.05, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.unet.state_dict().items()}


def meta_of(sd, **kw) -> dict:
    return {"base": sd.source, "base_fingerprint": sd.fingerprint, "token": "sks", "class_noun": "dog", "step": 400,
            "reward": 0.5, "config": {"lr": 5e-6, "out": Path("runs/x"), "betas": (0.9, 0.999)}, **kw}


def test_checkpoint_round_trip(weights, tmp_path):
    """best.safetensors: the tensors in float32, the meta in the safetensors header as strings (safe_open, the
    reference reader, shows them), and back with their types."""
    sd = load_sd(weights["diffusers"])
    state = {k: v.half() for k, v in finetuned(sd).items()}
    path = save_checkpoint(tmp_path / "ckpts" / BEST, state, meta_of(sd, class_noun="007"))
    assert [p.name for p in path.parent.iterdir()] == [BEST]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        assert set(f.keys()) == set(state) and f.get_tensor("conv_in.weight").dtype == torch.float32
    assert header["tinyrpo.format"] == FORMAT and header["tinyrpo.version"] == "2"
    assert header["tinyrpo.content"] == "unet" and header["format"] == "pt"
    assert header["base"] == sd.source and header["token"] == "sks" and header["step"] == "400"
    assert json.loads(header["config"]) == {"lr": 5e-6, "out": "runs/x", "betas": [0.9, 0.999]}
    got, meta = load_checkpoint(path)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in state.items())
    assert meta["config"] == {"lr": 5e-6, "out": "runs/x", "betas": [0.9, 0.999]}
    assert meta["step"] == 400 and meta["reward"] == 0.5 and meta["class_noun"] == "007"  # "007" stays a string
    assert meta["content"] == "unet" and meta["base_fingerprint"] == sd.fingerprint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / BEST
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})

    def dies_midway(obj, f, *a, **kw):
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        else:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C (or a crash) while writing

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == [BEST]  # no partial file, no temporary left
    state, meta = load_checkpoint(path)  # the previous checkpoint is intact
    assert meta["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_sample_with_checkpoint(weights, tmp_path):
    """--ckpt loads the fine-tuned U-Net; without --weights the checkpoint's recorded base is used."""
    sd = load_sd(weights["single"])
    state = finetuned(sd)
    ckpt = save_checkpoint(tmp_path / "dog" / BEST, state, meta_of(sd))
    args = ["--prompt", PROMPTS[0], "--sample-steps", 2, "--images-per-prompt", 1, "--height", SIZE, "--width", SIZE, "--device", "cpu"]
    paths = run_sample("--ckpt", ckpt, "--out", tmp_path / "a", *args)
    base = run_sample("--weights", weights["single"], "--out", tmp_path / "b", *args)

    sd.unet.load_state_dict(state)
    want, _ = generate(sd, PROMPTS[0], n=1, steps=2, height=SIZE, width=SIZE, progress=False)
    assert_same_pixels(read_pngs(paths[:1]), to_uint8(want))
    assert np.abs(read_pngs(paths[:1]).astype(int) - read_pngs(base[:1])).max() > 10  # the fine-tuning shows
    text = Image.open(paths[0]).text
    assert text["ckpt"] == str(ckpt)
    params = parse_a1111(text["parameters"])  # the run's name, no hash: its exported file is not made yet
    assert params["Model"] == "dog" and "Model hash" not in params

    # The other layout of the same base is the same base.
    other_layout = load_sd(weights["diffusers"])
    assert apply_checkpoint(other_layout, ckpt)["token"] == "sks"


def lora_checkpoint(sd, path, scale=0.3, seed=0):
    """A LoRA checkpoint as train.py writes it (rank 4, α 2, random A and B), and the adapted U-Net (unmerged)."""
    unet = copy.deepcopy(sd.unet)
    add_lora(unet, 4, alpha=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(unet).values():
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return save_checkpoint(path, lora_state_dict(unet), meta_of(sd), lora=lora_config(unet)), unet


def test_sample_with_lora_checkpoint(weights, tmp_path):
    """--ckpt with a LoRA checkpoint merges the adapters, --lora-scale scaling them: the images equal the
    unmerged adapted U-Net's (tinyrpo.lora's forward, eq. 3)."""
    sd = load_sd(weights["single"])
    ckpt, adapted = lora_checkpoint(sd, tmp_path / "dog" / BEST)
    args = ["--prompt", PROMPTS[0], "--sample-steps", 2, "--images-per-prompt", 1, "--height", SIZE, "--width", SIZE, "--device", "cpu"]
    paths = run_sample("--ckpt", ckpt, "--lora-scale", 0.5, "--out", tmp_path / "a", *args)
    set_lora_scale(adapted, 0.5)
    want, _ = generate(sd, PROMPTS[0], n=1, steps=2, height=SIZE, width=SIZE, progress=False, unet=adapted)
    assert_same_pixels(read_pngs(paths[:1]), to_uint8(want))
    base, _ = generate(sd, PROMPTS[0], n=1, steps=2, height=SIZE, width=SIZE, progress=False)
    assert np.abs(to_uint8(want).astype(int) - to_uint8(base)).max() > 10  # the LoRA shows
    params = parse_a1111(Image.open(paths[0]).text["parameters"])
    assert params["Model"] == "tiny-sd-v1" and params["Model hash"] == model_hash(weights["single"])
    assert params["Lora hashes"] == f"dog: {lora_hash(ckpt)}"


def test_apply_checkpoint_checks_shapes(weights, tmp_path):
    sd = load_sd(weights["single"])
    state = sd.unet.state_dict()
    state["conv_in.weight"] = state["conv_in.weight"][:, :3]
    ckpt = save_checkpoint(tmp_path / BEST, state, meta_of(sd))
    with pytest.raises(UserError, match=r"does not fit.*conv_in\.weight"):
        apply_checkpoint(sd, ckpt)


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit code 2 and one line on stderr, no traceback


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, [*map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def bad_ckpts(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    other = load_sd(weights["other"])
    ckpt = save_checkpoint(root / "other" / BEST, other.unet.state_dict(), meta_of(other))
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])  # truncated mid-write
    foreign = root / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    foreign_st = root / "foreign.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2)}, foreign_st)
    resumable = root / "state.pt"  # train.py's last.pt, under another name
    torch.save({"unet": {"w": torch.ones(1)}, "optimizer": {}, "rng": torch.zeros(4, dtype=torch.uint8)}, resumable)
    (root / "run").mkdir()
    last = root / "run" / "last.pt"
    last.write_bytes(resumable.read_bytes())
    return {"other": ckpt, "corrupt": corrupt, "foreign": foreign,
            "foreign_st": foreign_st, "resumable": resumable, "last": last}


@pytest.mark.parametrize("case,args,expect", [
    ("odd height", ["--height", 33], "--height must be a multiple of 2"),
    ("odd width", ["--width", 31], "--width must be a multiple of 2"),
    ("steps 0", ["--sample-steps", 0], "--sample-steps must be at least 1"),
    ("n 0", ["--images-per-prompt", 0], "--images-per-prompt must be at least 1"),
    ("negative guidance", ["--guidance", -1], "--guidance must be >= 0"),
    ("eta > 1", ["--eta", 1.5], "--eta must be in [0, 1]"),
    ("missing ckpt", ["--ckpt", "nowhere/best.safetensors"], "checkpoint nowhere/best.safetensors not found"),
    ("corrupt ckpt", ["--ckpt", "corrupt"], "truncated, corrupt"),
    ("foreign ckpt", ["--ckpt", "foreign"], "not a tinyrpo checkpoint"),
    ("a LoRA as ckpt", ["--ckpt", "foreign_st"], "is a LoRA (weight deltas for a base model), not a checkpoint"),
    ("last.pt", ["--ckpt", "last"], "last.pt is train.py's resumable state"),
    ("resumable state", ["--ckpt", "resumable"], "resumable state (weights, optimizer, RNG: for train.py --resume)"),
    ("other base", ["--ckpt", "other"], "was trained from"),
    ("lora scale alone", ["--lora-scale", 0.5], "--lora-scale sets the strength of a LoRA"),
])
def test_bad_input(weights, bad_ckpts, capsys, tmp_path, case, args, expect):
    args = [bad_ckpts.get(a, a) for a in args]
    err = cli_error(capsys, "--weights", weights["single"], "--prompt", "a dog", "--sample-steps", 1, "--images-per-prompt", 1,
                    "--height", SIZE, "--width", SIZE, "--out", tmp_path, *args)
    assert expect in err, err
    if case == "other base":
        assert f"pass --weights {weights['other']}" in err
    if case in ("last.pt", "resumable state"):
        assert f"pass {Path(args[1]).with_name(BEST)}" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_weights_names_download_command(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", "a dog", "--weights",
                        str(tmp_path / "sd15")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "python -m tinyrpo.download sd15" in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Non-finite numbers, odd paths, LoRA mix-ups, threads (issue 19)


@contextlib.contextmanager
def no_hang(fifo: Path):
    """A FIFO opened for reading blocks until a writer comes: be that writer (open and close, again and again), so
    a reader gets end-of-file and the test fails on its message instead of hanging."""
    stop = threading.Event()

    def writer():
        while not stop.wait(0.05):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
            except OSError:
                pass
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def odd_files(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    sd = load_sd(weights["single"])
    lora, _ = lora_checkpoint(sd, root / "dog" / BEST)
    (root / "copy").mkdir()
    copy_ = root / "copy" / "lora.safetensors"
    copy_.write_bytes(lora.read_bytes())
    text = root / "notes.txt"
    text.write_text("a sks dog on the beach\n")  # torch.load would answer with its weights_only paragraph
    text_pt = root / "notes.pt"
    text_pt.write_text("ccc\n")
    random_st = root / "random.safetensors"
    save_file({"w": torch.ones(3)}, random_st)
    fifo = root / "fifo.safetensors"
    os.mkfifo(fifo)
    return {"lora": lora, "lora_copy": copy_, "text": text, "text_pt": text_pt, "random_st": random_st,
            "fifo": fifo, "a_file": text, "sd_file": weights["single"],
            "unet_alone": weights["diffusers"] / "unet" / "diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("case,args,expect", [
    ("nan lora scale", ["--lora-scale", "nan", "--lora", "lora"], "--lora-scale must be a finite number (got nan)"),
    ("inf lora scale", ["--lora-scale", "inf", "--ckpt", "lora"], "--lora-scale must be a finite number (got inf)"),
    ("huge lora scale", ["--lora-scale", "1e38", "--lora", "lora"], "the images came out NaN or infinite"),
    ("inf guidance", ["--guidance", "inf"], "--guidance must be a finite number (got inf)"),
    ("nan guidance", ["--guidance", "nan"], "--guidance must be a finite number (got nan)"),
    ("nan eta", ["--eta", "nan"], "--eta must be a finite number (got nan)"),
    ("threads 0", ["--threads", 0], "--threads must be at least 1"),
    ("out is a file", ["--out", "a_file"], "is a file, not a folder"),
    ("out under a file", ["--out", "a_file/x"], "is a file, so no folder can be made there"),
    ("fifo weights", ["--weights", "fifo"], "is a named pipe (FIFO), not a regular file"),
    ("fifo ckpt", ["--ckpt", "fifo"], "is a named pipe (FIFO), not a regular file"),
    ("fifo lora", ["--lora", "fifo"], "is a named pipe (FIFO), not a regular file"),
    ("same lora twice", ["--ckpt", "lora", "--lora", "lora"], "are the same LoRA, which would be merged twice"),
    ("a copy of it", ["--ckpt", "lora", "--lora", "lora_copy"], "are the same LoRA, which would be merged twice"),
    ("text as lora", ["--lora", "text"], "is a text file, not a LoRA; --lora takes"),
    ("text .pt as lora", ["--lora", "text_pt"], "is a text file, not a LoRA; --lora takes"),
    ("random tensors", ["--lora", "random_st"], "w is not a LoRA tensor name"),
    ("a U-Net as lora", ["--lora", "unet_alone"], "a diffusers U-Net alone (the unet/ of an SD folder), not a LoRA"),
    ("SD as lora", ["--lora", "sd_file"], "single-file checkpoint, not a LoRA: pass it as --weights"),
])
def test_odd_input_is_one_line(weights, odd_files, capsys, tmp_path, case, args, expect):
    args = [odd_files.get(a, a) if isinstance(a, str) and "/" not in a else a for a in args]
    args = [odd_files["a_file"] / "x" if a == "a_file/x" else a for a in args]
    out = tmp_path / "out"
    with no_hang(odd_files["fifo"]):
        err = cli_error(capsys, "--weights", weights["single"], "--prompt", "a dog", "--sample-steps", 1, "--images-per-prompt", 1,
                        "--height", SIZE, "--width", SIZE, "--out", out, *args)
    assert expect in err, err
    assert not out.exists()  # nothing written


def test_threads(weights, tmp_path, monkeypatch):
    """--threads N sets torch's threads; without it a model as small as the toy world's runs on 1."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    args = ["--weights", weights["single"], "--prompt", "a dog", "--sample-steps", 1, "--images-per-prompt", 1, "--height", SIZE]
    run_sample(*args, "--out", tmp_path / "a", "--threads", 3)
    assert calls == [3]
    calls.clear()
    run_sample(*args, "--out", tmp_path / "b")
    assert calls == [1]
    monkeypatch.setattr(sample, "SMALL_UNET", 10)  # an SD-sized model: torch's default
    calls.clear()
    run_sample(*args, "--out", tmp_path / "c")
    assert calls == []


# ---------------------------------------------------------------------------------------------------------
# A full disk, a read-only folder, a write failing halfway: one line, nothing half-written, old runs untouched


def sample_args(weights, out, *extra):
    return ["--weights", weights["single"], "--prompt", "a dog", "--prompt", "a cat", "--sample-steps", 1, "--images-per-prompt", 2,
            "--height", SIZE, "--width", SIZE, "--out", out, *extra]


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def fail_on_save(monkeypatch, at: int, error=None):
    """PIL's Image.save writes part of a PNG, then fails like a full disk, on its `at`-th call."""
    real, count = Image.Image.save, [0]

    def save(self, fp, *a, **kw):
        count[0] += 1
        if count[0] == at:
            fp.write(b"\x89PNG\r\n\x1a\n half")
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *a, **kw)
    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("overwrite", [False, True], ids=["numbered", "overwrite"])
@pytest.mark.parametrize("at", [1, 4])
def test_write_failing_halfway(weights, tmp_path, capsys, monkeypatch, overwrite, at):
    out = tmp_path / "samples"
    run_sample(*sample_args(weights, out))  # an earlier run: 0000/
    if overwrite:
        run_sample(*sample_args(weights, out, "--seed", 5, "--overwrite"))  # and files straight in --out
    before = listing(out)
    fail_on_save(monkeypatch, at)
    err = cli_error(capsys, *sample_args(weights, out, *(["--overwrite"] if overwrite else [])))
    assert "no space left on the device" in err and str(out) in err, err
    assert listing(out) == before  # no new folder, no partial PNG, no temporary, the old files as they were


def test_ctrl_c_while_writing_leaves_no_run(weights, tmp_path, monkeypatch):
    fail_on_save(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_sample(*sample_args(weights, tmp_path / "samples"))
    assert listing(tmp_path / "samples") == {}


def test_full_disk(weights, small_disk, capsys):
    out = small_disk / "samples"
    run_sample(*sample_args(weights, out))  # fits
    (small_disk / "filler").write_bytes(b"\0" * (64 * 1024 - 3 * 4096 - sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file())))
    before = listing(out)
    err = cli_error(capsys, *sample_args(weights, out, "--seed", 9))
    assert "no space left on the device" in err, err
    assert listing(out) == before


def test_read_only_out(weights, read_only_folder, capsys):
    err = cli_error(capsys, *sample_args(weights, read_only_folder / "samples"))
    assert "read-only or no permission" in err, err
    assert listing(read_only_folder) == {}


def test_merge_refuses_overflowing_weights():
    """A LoRA update too large for the weights' dtype: one line naming the layer, not NaN images."""
    from types import SimpleNamespace
    from tinyrpo.formats.lora_files import LoRAUpdate, merge_updates
    model = SimpleNamespace(unet=torch.nn.Sequential(torch.nn.Linear(4, 4)))
    u = LoRAUpdate("unet", "0", torch.full((2, 4), 1e15), torch.full((4, 2), 1e15), alpha=2.0)  # B A = 2e30
    merge_updates(model, [u], 1.0, "x.safetensors")  # large, but a float32
    with pytest.raises(UserError, match=r"at --lora-scale 10000000000\.0 makes unet layer 0 overflow"):
        merge_updates(model, [u], 1e10, "x.safetensors")


def test_without_sd15_a_checkout_is_told_how_to_draw_with_the_toy_model(tmp_path, monkeypatch):
    """A fresh clone has weights/toy and no weights/sd15: the one line names the toy model's command."""
    (tmp_path / "weights" / "toy" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no Stable Diffusion v1.5 weights at weights/sd15: draw with the toy "
                                        r"model .*`python sample.py --weights weights/toy/sd --prompt"):
        sample.main(["--prompt", "a toy", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # without the toy model either, the download is what is said
    (tmp_path / "weights" / "toy" / "sd").rmdir()
    with pytest.raises(UserError, match=r"run `python -m tinyrpo.download sd15`"):
        sample.main(["--prompt", "a toy", "--out", str(tmp_path / "out")])
