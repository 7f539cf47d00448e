"""DreamBench evaluation: the metrics on hand-made cases, against transformers, and the command end to end."""
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.fixtures import make_tiny_clip, make_tiny_dino, make_tiny_sd
from tinyrpo import dreambench
from tinyrpo.data import load_subject
from tinyrpo.dino import IMAGENET_MEAN, IMAGENET_STD
from tinyrpo.errors import UserError
from tinyrpo.evaluate import main
from tinyrpo.evaluation.scores import (REWARD_MODEL_NOTE, Embedder, harmonic_scores, image_scores, pair_cosine,
                                       scoring_prompt, text_cosine)
from tinyrpo.formats.checkpoint import save_checkpoint
from tinyrpo.formats.weights import load_clip, load_dino, load_sd
from tinyrpo.reward import CLIPScorer, score
from tinyrpo.rpo import align_i, align_t, harmonic_reward

R2 = 1 / math.sqrt(2)
ROOT = Path(__file__).resolve().parents[1]
RES = 32  # tiny SD: VAE factor 2 -> 16x16 latents


# ------------------------------------------------------------------------------------------ pure functions

def test_pair_cosine_all_pairs():
    gen = torch.tensor([[1.0, 0.0], [0.0, 3.0]])           # norms don't matter
    refs = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    # gen 0: cos 1, 1/√2, 0;  gen 1: cos 0, 1/√2, -1
    expect = [(1 + R2 + 0) / 3, (0 + R2 - 1) / 3]
    assert pair_cosine(gen, refs).tolist() == pytest.approx(expect)
    # the mean over images is the mean over all 6 (generated, reference) pairs
    assert pair_cosine(gen, refs).mean().item() == pytest.approx((1 + 2 * R2 + 0 + 0 - 1) / 6)


def test_pair_cosine_excludes_self_pairs():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cosines: (0,1) = 0, (0,2) = (1,2) = 1/√2; self-pairs (cos 1) must not count
    assert pair_cosine(e, e, exclude_self=True).tolist() == pytest.approx([R2 / 2, R2 / 2, R2])
    assert pair_cosine(e, e, exclude_self=True).mean().item() == pytest.approx(2 * (0 + 2 * R2) / 6)
    assert pair_cosine(e, e).tolist() == pytest.approx([(1 + R2) / 3, (1 + R2) / 3, (1 + 2 * R2) / 3])
    with pytest.raises(ValueError):
        pair_cosine(e[:1], e[:1], exclude_self=True)  # one image has no other to compare with
    with pytest.raises(ValueError):
        pair_cosine(e[:2], e, exclude_self=True)


def test_text_cosine_is_rowwise():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[0.0, 5.0], [2.0, 2.0]])
    assert text_cosine(img, txt).tolist() == pytest.approx([0.0, 1.0])


def test_scoring_prompt_removes_only_the_token():
    assert scoring_prompt("a sks dog on the beach", "sks") == "a dog on the beach"
    assert scoring_prompt("a red sks backpack", "sks") == "a red backpack"
    assert scoring_prompt("a sks stuffed animal in the snow", "sks") == "a stuffed animal in the snow"
    assert scoring_prompt("a sksy dog", "sks") == "a sksy dog"  # a word that merely contains it stays
    for templates, cls in ((dreambench.LIVE_PROMPTS, "cat"), (dreambench.OBJECT_PROMPTS, "teapot")):
        for t, p in zip(templates, dreambench.fill(templates, "xyz", cls)):
            assert scoring_prompt(p, "xyz") == " ".join(t.format("", cls).split())


def test_harmonic_is_the_training_reward():
    g = torch.Generator().manual_seed(0)
    gen, refs, txt = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (5, 3, 5))
    h = harmonic_scores(pair_cosine(gen, refs), text_cosine(gen, txt), 0.3)  # λ = 0.3: not symmetric in λ, 1 − λ
    assert torch.allclose(h["align_i"], align_i(gen, refs), atol=1e-6)
    assert torch.allclose(h["align_t"], align_t(gen, txt), atol=1e-6)
    assert torch.allclose(h["harmonic"], harmonic_reward(align_i(gen, refs), align_t(gen, txt), 0.3), atol=1e-6)
    assert not torch.allclose(h["harmonic"], harmonic_reward(align_i(gen, refs), align_t(gen, txt), 0.7), atol=1e-4)


# ------------------------------------------------------------------------------------------ tiny models

def photo(w, h, seed, color=(200, 60, 40)) -> Image.Image:
    """A synthetic photo: a coloured disc on a noisy background, placed a little differently per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    cx, cy = w // 2 + rng.integers(-w // 8, w // 8 + 1), h // 2 + rng.integers(-h // 8, h // 8 + 1)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(w, h) // 4) ** 2] = color
    return Image.fromarray(img)


def make_subject(folder: Path, n=3, seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):  # odd sizes, so resize and crop both matter
        photo(300 + 17 * k, 260 + 31 * k, seed + k, (200, 60 + 30 * k, 40)).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"sd": make_tiny_sd(d / "sd"), "clip": make_tiny_clip(d / "clip"), "dino": make_tiny_dino(d / "dino")}


# ------------------------------------------------------------------------------------------ vs transformers

def dino_transform(image: Image.Image, crop: int) -> np.ndarray:
    """DINO's documented eval transform, written out: Resize(256) bicubic on the short side, CenterCrop(224)
    (torchvision: offsets rounded), ImageNet mean/std; scaled to a `crop`-pixel model as 256/224 · crop."""
    resize = crop * 256 // 224
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    x = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255
    top, left = int(round((size[1] - crop) / 2)), int(round((size[0] - crop) / 2))
    x = (x[top:top + crop, left:left + crop] - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


def test_dino_transform_is_dino_preprocess_at_224():
    from tinyrpo.dino import dino_preprocess
    for im in (photo(300, 257, 0), photo(181, 411, 1)):
        assert np.abs(dino_preprocess([im]).numpy()[0] - dino_transform(im, 224)).max() <= 1e-5


def test_metrics_match_transformers(models, tmp_path):
    """DINO, CLIP-I and CLIP-T of tinyrpo equal those computed with transformers' models and preprocessing
    from the same files, the pairs averaged by hand."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, ViTModel

    from tinyrpo.tokenizer import CLIPTokenizer as OurTokenizer

    refs = [photo(300 + 13 * k, 240 + 7 * k, k) for k in range(3)]
    gens = [photo(64, 64, 10 + k, (40, 90, 200)) for k in range(4)]
    prompts = ["a sks toy on the beach", "a sks toy in the snow", "a red sks toy", "a sks toy on the beach"]
    texts = [scoring_prompt(p, "sks") for p in prompts]
    assert texts[0] == "a toy on the beach"

    emb = Embedder(load_clip(models["clip"]), load_dino(models["dino"]), batch_size=3)  # batches split the images
    gen_e, ref_e = emb.images(gens, progress=False), emb.images(refs, progress=False)
    ours = image_scores(gen_e, ref_e, emb.texts(texts), 0.5)
    real = image_scores(ref_e, ref_e, emb.texts(["a photo of a toy"] * 3), 0.5, exclude_self=True)

    hf_clip = CLIPModel.from_pretrained(models["clip"]).eval()
    hf_dino = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False).eval()
    size = hf_clip.config.vision_config.image_size
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tok_dir = tmp_path / "tok"
    OurTokenizer.from_bpe_gz().save_vocab(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        def clip_embed(images, strings):
            ids = tok(strings, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = hf_clip(input_ids=ids, pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
            return out.image_embeds.double().numpy(), out.text_embeds.double().numpy()

        def dino_embed(images):
            x = torch.from_numpy(np.stack([dino_transform(im, hf_dino.config.image_size) for im in images]))
            return hf_dino(pixel_values=x).last_hidden_state[:, 0].double().numpy()

        g_clip, t_clip = clip_embed(gens, texts)
        r_clip, rt_clip = clip_embed(refs, ["a photo of a toy"] * 3)
        g_dino, r_dino = dino_embed(gens), dino_embed(refs)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for i in range(len(gens)):
        assert ours["dino"][i].item() == pytest.approx(np.mean([cos(g_dino[i], r) for r in r_dino]), abs=1e-5)
        assert ours["clip_i"][i].item() == pytest.approx(np.mean([cos(g_clip[i], r) for r in r_clip]), abs=1e-5)
        assert ours["clip_t"][i].item() == pytest.approx(cos(g_clip[i], t_clip[i]), abs=1e-5)
    for i in range(len(refs)):  # the real-images row: the other reference photos only
        others = [j for j in range(len(refs)) if j != i]
        assert real["dino"][i].item() == pytest.approx(np.mean([cos(r_dino[i], r_dino[j]) for j in others]), abs=1e-5)
        assert real["clip_i"][i].item() == pytest.approx(np.mean([cos(r_clip[i], r_clip[j]) for j in others]), abs=1e-5)
        assert real["clip_t"][i].item() == pytest.approx(cos(r_clip[i], rt_clip[i]), abs=1e-5)
    # identical prompts on identical images score identically; different prompts don't
    assert ours["clip_t"][0].item() != pytest.approx(ours["clip_t"][1].item(), abs=1e-7)


# ------------------------------------------------------------------------------------------ the command

def common(models, *extra):
    # one DDIM step, all 25 images in one U-Net pass: the tiny U-Net is quickest on the CPU that way
    return ["--eval-clip", str(models["clip"]), "--dino", str(models["dino"]), "--sample-steps", "1",
            "--images-per-prompt", "1", "--gen-batch-size", "25", "--device", "cpu", "--no-progress", *extra]


def make_ckpt(models, path: Path) -> Path:
    """A "fine-tuned" checkpoint as train.py writes it: the base U-Net nudged, meta with a token and class."""
    sd = load_sd(models["sd"])
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.unet.state_dict().items()}
    meta = {"base": str(models["sd"]), "base_fingerprint": sd.fingerprint, "token": "zwx", "class_noun": "toy",
            "live": False, "reward_model": str(models["clip"]), "config": {"resolution": RES}}
    return save_checkpoint(path, state, meta)


def test_evaluate_checkpoint_base_and_real(models, tmp_path, monkeypatch, capsys):
    subject = make_subject(tmp_path / "refs" / "mytoy")
    ckpt = make_ckpt(models, tmp_path / "runs" / "mytoy" / "best.safetensors")
    assert main(["--ckpt", str(ckpt), "--subject", str(subject), *common(models)]) == 0
    out = ckpt.parent / "eval"
    table = capsys.readouterr().out
    r = json.loads((out / "eval.json").read_text())
    assert (out / "eval.md").read_text() in table and "| **overall** |" in table
    assert r["token"] == "zwx" and r["class_noun"] == "toy" and not r["live"]  # defaults from the checkpoint
    assert r["settings"]["resolution"] == RES and r["models"]["weights"] == str(models["sd"])
    assert r["notes"] == [REWARD_MODEL_NOTE] and REWARD_MODEL_NOTE in table  # eval CLIP = training reward model
    prompts = [row["prompt"] for row in r["prompts"]]
    assert prompts == dreambench.fill(dreambench.OBJECT_PROMPTS, "zwx", "toy")
    assert all("zwx" not in row["scored_text"] and "toy" in row["scored_text"] for row in r["prompts"])
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 25 and Image.open(grids[0]).size == (RES, RES)
    for k in ("dino", "clip_i", "clip_t", "harmonic"):
        assert r["overall"][k] == pytest.approx(np.mean([row[k] for row in r["prompts"]]), abs=1e-6)
        assert -1 <= r["overall"][k] <= 1
    assert r["reference"]["images"] == 3 and r["reference"]["clip_t_text"] == "a photo of a toy"

    # h_λ is the training reward: tinyrpo.reward.score on the saved images (grids of one image, lossless PNG)
    scorer = CLIPScorer(load_clip(models["clip"]))
    refs = load_subject(subject, "zwx", "toy", resolution=RES).images
    images = [Image.open(out / row["grid"]).convert("RGB") for row in r["prompts"]]
    s = score(scorer, images, prompts, scorer.embed_images(refs), "zwx", 0.5)
    assert s.reward.tolist() == pytest.approx([row["harmonic"] for row in r["prompts"]], abs=1e-5)
    assert s.align_t.tolist() == pytest.approx([(row["clip_t"] + 1) / 2 for row in r["prompts"]], abs=1e-5)

    # the base model: default folder runs/base-<subject>/eval, no note, different images
    monkeypatch.chdir(tmp_path)
    assert main(["--subject", str(subject), "--weights", str(models["sd"]), "--resolution", str(RES),
                 "--class-noun", "toy", "--eval-clip", str(models["clip"]), *common(models)[2:]]) == 0
    base = json.loads((tmp_path / "runs" / "base-mytoy" / "eval" / "eval.json").read_text())
    assert base["notes"] == [] and base["token"] == "sks" and base["models"]["ckpt"] is None
    assert base["overall"]["clip_i"] != pytest.approx(r["overall"]["clip_i"], abs=1e-6)

    # --real: the photos against each other, self-pairs excluded, at an asymmetric λ (0.3 and 0.7 differ)
    assert main(["--real", "--subject", str(subject), "--class-noun", "toy", "--resolution", str(RES),
                 "--lambda-val", "0.3", *common(models)]) == 0
    real = json.loads((tmp_path / "runs" / "real-mytoy" / "eval" / "eval.json").read_text())
    assert real["prompts"] == [] and not (tmp_path / "runs" / "real-mytoy" / "eval" / "grids").exists()
    # The oracle: embeddings of the photos, every ordered pair i != j averaged by hand with numpy.
    emb = Embedder(load_clip(models["clip"]), load_dino(models["dino"]))
    photos = load_subject(subject, "sks", "toy", resolution=RES).images
    e = emb.images(photos, progress=False)
    d, c = (np.asarray(F.normalize(x.double(), dim=-1)) for x in (e.dino, e.clip))
    t = np.asarray(F.normalize(emb.texts(["a photo of a toy"]).double(), dim=-1))[0]
    n = len(photos)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    clip_i = [np.mean([c[i] @ c[j] for j in range(n) if j != i]) for i in range(n)]  # per photo
    clip_t = [c[i] @ t for i in range(n)]
    h = [1 / (0.3 / ((ci + 1) / 2) + 0.7 / ((ct + 1) / 2)) for ci, ct in zip(clip_i, clip_t)]  # eq. 5, λ = 0.3
    want = {"dino": np.mean([d[i] @ d[j] for i, j in pairs]), "clip_i": np.mean([c[i] @ c[j] for i, j in pairs]),
            "clip_t": np.mean(clip_t), "harmonic": np.mean(h)}
    for k, v in want.items():
        assert real["overall"][k] == pytest.approx(v, abs=1e-6), k
    assert real["overall"]["harmonic"] != pytest.approx(
        np.mean([1 / (0.7 / ((ci + 1) / 2) + 0.3 / ((ct + 1) / 2)) for ci, ct in zip(clip_i, clip_t)]), abs=1e-4)


@pytest.mark.parametrize("case", ["no_eval_clip", "no_dino", "no_sd", "no_subject", "lambda", "images0",
                                  "real_ckpt", "stray_train_args", "subjects_alone", "no_target", "bad_device"])
def test_user_errors(models, tmp_path, case):
    subject = make_subject(tmp_path / "refs" / "dog", n=2)
    args = ["--subject", str(subject), "--weights", str(models["sd"]), *common(models)]
    expect = {"no_eval_clip": "python -m tinyrpo.download clip-b32", "no_dino": "python -m tinyrpo.download dino",
              "no_sd": "python -m tinyrpo.download sd15", "no_subject": "does not exist", "lambda": "--lambda-val",
              "images0": "--images-per-prompt", "real_ckpt": "drop --ckpt", "stray_train_args": "--dreambench",
              "subjects_alone": "--dreambench", "no_target": "--subject", "bad_device": "--device"}[case]
    if case == "no_eval_clip":
        args[args.index("--eval-clip") + 1] = str(tmp_path / "weights" / "clip-vit-base-patch32")
    elif case == "no_dino":
        args[args.index("--dino") + 1] = str(tmp_path / "weights" / "dino-vits16")
    elif case == "no_sd":
        args[args.index("--weights") + 1] = str(tmp_path / "weights" / "sd15")
    elif case == "no_subject":
        args[1] = str(tmp_path / "refs" / "nope")
    elif case == "lambda":
        args += ["--lambda-val", "1.5"]
    elif case == "images0":
        args += ["--images-per-prompt", "0"]
    elif case == "real_ckpt":
        args += ["--real", "--ckpt", str(tmp_path / "best.safetensors")]
    elif case == "stray_train_args":
        args += ["--", "--steps", "3"]
    elif case == "subjects_alone":
        args += ["--subjects", "dog"]
    elif case == "no_target":
        args = args[2:]
    elif case == "bad_device":
        args += ["--device", "nonsense"]
    with pytest.raises(UserError, match=expect):
        main(args)


@pytest.mark.parametrize("case", ["dreambench_and_subject", "dreambench_and_live", "moved"])
def test_dreambench_user_errors(models, tmp_path, case):
    """--dreambench here is the older spelling of python -m tinyrpo.compare --dreambench: it names that command."""
    root = tmp_path / "refs"
    make_subject(root / "dog", n=2)
    args = ["--dreambench", str(root), *common(models)]
    expect = {"dreambench_and_subject": "--subjects", "dreambench_and_live": "--live/--object",
              "moved": "tinyrpo.compare's job; run `python -m tinyrpo.compare --dreambench"}[case]
    if case == "dreambench_and_subject":
        args += ["--subject", str(root / "dog")]
    elif case == "dreambench_and_live":
        args += ["--object"]
    with pytest.raises(UserError, match=expect):
        main(args)


def test_cli_reports_user_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyrpo.evaluate", "--subject", str(make_subject(tmp_path / "dog", 1)),
                        "--eval-clip", str(tmp_path / "clip"), "--weights", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "clip-b32" in r.stderr


# ------------------------------------------------------------------------------------------------- odd input, full disks (issue 19)

@pytest.mark.parametrize("extra, says", [
    (["--guidance", "inf"], "--guidance and --lambda-val must be finite numbers (got inf, 0.5)"),
    (["--guidance", "nan"], "--guidance and --lambda-val must be finite numbers (got nan, 0.5)"),
    (["--lambda-val", "nan"], "--guidance and --lambda-val must be finite numbers (got 7.5, nan)"),
    (["--threads", "0"], "--threads must be at least 1 (got 0)"),
    (["--out", "A_FILE"], "is a file, not a folder"),
    (["--weights", "PIPE"], "--weights PIPE is a named pipe (FIFO), not a regular file"),
    (["--ckpt", "PIPE"], "--ckpt PIPE is a named pipe (FIFO), not a regular file"),
    (["--dino", "PIPE"], "--dino PIPE is a named pipe (FIFO), not a regular file"),
])
def test_odd_input(models, tmp_path, extra, says):
    subject = make_subject(tmp_path / "refs" / "dog", n=2)
    fifo, a_file = tmp_path / "fifo", tmp_path / "a_file"
    os.mkfifo(fifo)
    a_file.write_text("x")
    extra = [str(fifo) if a == "PIPE" else str(a_file) if a == "A_FILE" else a for a in extra]
    args = ["--subject", str(subject), "--weights", str(models["sd"]), *common(models), "--out", str(tmp_path / "o"),
            *extra]
    with pytest.raises(UserError) as e:
        main(args)
    assert says.replace("PIPE", str(fifo)) in str(e.value), e.value
    assert not (tmp_path / "o").exists()


def test_threads_from_subject_json(models, tmp_path, monkeypatch):
    """The toy world's subject.json says 1 thread: evaluate uses it, and --threads wins over it."""
    subject = make_subject(tmp_path / "refs" / "dog", n=2)
    (subject / "subject.json").write_text(json.dumps({"class_noun": "dog", "train_defaults": {"threads": 1}}))
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    main(["--subject", str(subject), "--real", *common(models), "--out", str(tmp_path / "a")])
    assert calls == [1]
    main(["--subject", str(subject), "--real", *common(models), "--out", str(tmp_path / "b"), "--threads", "3"])
    assert calls == [1, 3]


def eval_listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("at", [1, 3])
def test_write_failing_halfway_keeps_the_earlier_evaluation(models, tmp_path, monkeypatch, at):
    subject = make_subject(tmp_path / "refs" / "dog", n=2)
    out = tmp_path / "eval"
    args = ["--subject", str(subject), "--weights", str(models["sd"]), "--resolution", str(RES), *common(models),
            "--out", str(out)]
    main(args)
    before = eval_listing(out)
    assert "eval.json" in before and len([k for k in before if k.startswith("grids/")]) == 25
    real, count = Image.Image.save, [0]

    def save(self, fp, *a, **kw):  # the at-th grid: part of a PNG, then a full disk
        count[0] += 1
        if count[0] == at:
            fp.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *a, **kw)
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(UserError, match="no space left on the device"):
        main(args + ["--seed", "3"])
    assert eval_listing(out) == before  # no partial grid, no temporary, the earlier eval.json and grids as they were


def test_full_disk_and_read_only_out(models, tmp_path, small_disk, read_only_folder):
    subject = make_subject(tmp_path / "refs" / "dog", n=2)
    (small_disk / "filler").write_bytes(b"\0" * (64 * 1024 - 2 * 4096))
    args = ["--subject", str(subject), "--weights", str(models["sd"]), "--resolution", str(RES), *common(models)]
    with pytest.raises(UserError, match="no space left on the device"):
        main(args + ["--out", str(small_disk / "eval")])
    assert not [p for p in (small_disk / "eval").rglob("*") if p.is_file()]
    with pytest.raises(UserError, match="read-only or no permission"):
        main(args + ["--out", str(read_only_folder / "eval")])
