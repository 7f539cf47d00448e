"""The shipped toy weights (weights/toy): they fit the size budget, load through the normal loaders and the
reference libraries alike, sample through the pipeline, draw what prompts ask (the quality check, on a
small sample), and the toy CLIP and DINO measure what they are for. Plus pretraining end to end, tiny."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyrpo.errors import UserError
from tinyrpo.formats.weights import load_clip, load_dino, load_sd
from tinyrpo.pipeline import generate
from tinyrpo.reward import CLIPScorer
from tinyrpo.toy import models
from tinyrpo.toy.pretrain import PretrainConfig
from tinyrpo.toy.quality import quality_prompts, run_quality
from tinyrpo.toy.subjects import SUBJECTS
from tinyrpo.toy.world import Picture, Thing, render

ROOT = Path(__file__).resolve().parents[1]
W = ROOT / "weights" / "toy"
MB = 2 ** 20


@pytest.fixture(scope="module")
def sd():
    return load_sd(W / "sd")


def test_files_fit_the_budget():
    files = sorted(W.rglob("*.safetensors"))
    assert {str(f.relative_to(W)) for f in files} == {
        "sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
        "sd/text_encoder/model.safetensors", "clip/model.safetensors", "dino/model.safetensors"}
    assert all(f.stat().st_size < 20 * MB for f in files)
    assert sum(f.stat().st_size for f in W.rglob("*") if f.is_file()) < 30 * MB


def test_sd_text_encoder_is_the_clip_text_tower(sd):
    clip = load_clip(W / "clip")
    towers = clip.text_model.state_dict()
    text = sd.text_encoder.text_model.state_dict()
    assert text.keys() == towers.keys() and all(torch.equal(text[k], towers[k]) for k in text)
    assert sd.vae.cfg.scaling_factor != 0.18215  # measured on the toy VAE's latents, not SD's value
    assert (sd.unet.cfg.sample_size, sd.vae.downsample_factor) == (8, 4)


def test_reference_libraries_read_the_same_files(sd):
    """The folders are the public layouts: diffusers and transformers load them and compute the same."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(W / "sd" / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(W / "sd" / "vae").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        assert torch.allclose(unet(x, 500, ctx).sample, sd.unet(x, 500, ctx), atol=1e-4)
        assert torch.allclose(vae.decode(x).sample, sd.vae.decode(x), atol=1e-4)
    assert vae.config.scaling_factor == sd.vae.cfg.scaling_factor

    ids = sd.tokenizer(["a red toy on the beach", ""])
    hf_text = transformers.CLIPTextModel.from_pretrained(W / "sd" / "text_encoder").float().eval()
    hf_clip = transformers.CLIPModel.from_pretrained(W / "clip").float().eval()
    clip = load_clip(W / "clip")
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(hf_text(ids).last_hidden_state, sd.text_encoder(ids), atol=1e-4)
        assert torch.allclose(hf_clip.visual_projection(hf_clip.vision_model(pixel_values=pixels).pooler_output), clip.visual_projection(
            clip.vision_model(pixels)), atol=1e-4)
    hf_dino = transformers.ViTModel.from_pretrained(W / "dino", add_pooling_layer=False).float().eval()
    with torch.no_grad():
        assert torch.allclose(hf_dino(pixels).last_hidden_state[:, 0], load_dino(W / "dino")(pixels), atol=1e-4)


def test_writers_round_trip(tmp_path):
    """save_sd / save_clip / save_dino write folders our loaders read back as the same configs and tensors, and
    diffusers' pipeline keeps the U-Net's sample size (a config claiming diffusers < 0.9 would reset 8 to 64)."""
    m = models.new_models()
    m["clip"] = models.with_new_image_tower(m["clip"])  # the shipped shape (pretraining stage 4)
    text = models.text_encoder_of(m["clip"])
    models.save_sd(tmp_path / "sd", m["unet"], m["vae"], text, dtype=torch.float32)
    models.save_clip(tmp_path / "clip", m["clip"], dtype=torch.float32)
    models.save_dino(tmp_path / "dino", m["dino"], dtype=torch.float32)
    sd, clip, dino = load_sd(tmp_path / "sd"), load_clip(tmp_path / "clip"), load_dino(tmp_path / "dino")
    assert (sd.unet.cfg, sd.vae.cfg, sd.text_encoder.config) == (models.UNET, models.VAE, models.TEXT)
    assert (clip.config, dino.config) == (models.CLIP, models.DINO_CFG)
    for ours, back in ((m["unet"], sd.unet), (m["vae"], sd.vae), (m["clip"], clip), (m["dino"], dino)):
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    assert pipe.unet.config.sample_size == models.UNET.sample_size


def test_toy_sd_draws_what_prompts_ask(sd):
    """The quality check of `python -m tinyrpo.toy quality` on a small sample (held-out compositions) at its
    settings, held to the issue's bars: on all 216 prompts the shipped weights read 100 % / 100 % / 99.5 %."""
    result = run_quality(sd, quality_prompts()[:32], guidance=5.0, steps=25, progress=False)
    assert result["background"] >= 0.9 and result["colour"] >= 0.8 and result["class"] >= 0.8, result


def test_sample_through_the_pipeline(sd):
    images, records = generate(sd, ["a sks toy on a red background", "a blue ball"], n=2, steps=10, height=32,
                               width=32, progress=False)
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    again, _ = generate(sd, ["a sks toy on a red background"], n=1, steps=10, height=32, width=32, progress=False)
    # seeded per prompt: the batch size changes only float rounding (measured 1.6e-5 at 1 thread, 2.0e-5 at 2)
    assert torch.allclose(again[0], images[0], atol=1e-4)


def test_toy_clip_and_dino_measure_what_they_are_for():
    """CLIP matches prompts to pictures (the reward's ALIGN-T); DINO says "the same object" across
    backgrounds and places, and "another object" for another instance of the same class and colour."""
    toy = SUBJECTS["toy"].thing
    pics = {"red": Picture(toy, 6, 8, 18, "red"), "blue": Picture(toy, 6, 8, 18, "blue"),
            "beach": Picture(toy, 10, 4, 16, "beach"),
            "other": Picture(Thing("toy", "yellow", (0, 4, 8), "black"), 10, 4, 16, "beach")}
    images = {k: Image.fromarray(render(p)) for k, p in pics.items()}
    scorer = CLIPScorer(load_clip(W / "clip"))
    im = scorer.embed_images([images["red"], images["blue"]])
    tx = scorer.embed_texts(["a toy on a red background", "a toy on a blue background"])
    sims = im @ tx.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]

    # DINO was trained to tell instances apart (tinyrpo/toy/pretrain.py): two views of one object (other
    # places, sizes, backgrounds) against other objects of the same class and colour, on pictures it never
    # saw. Measured: 0.89 vs 0.29, and the other view ranked first among 64 in 48 %. (It is not blind to the
    # background: one object on red vs the beach, 0.94, is below another pattern on the same beach, 0.98.)
    from tinyrpo.toy.pretrain import dino_check, rules
    check = dino_check(load_dino(W / "dino"), seed=12345, world=rules(), n=64)
    assert check["cos_same"] > check["cos_same_kind"] + 0.5 and check["top1"] > 0.3, check


def test_pretrain_end_to_end_tiny(tmp_path):
    """Every stage for a couple of steps, then the exported folders through the normal loaders."""
    from tinyrpo.toy.pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(out=str(tmp_path / "toy"), threads=1, vae_steps=2, vae_batch=4, clip_steps=2, clip_batch=8,
                         unet_pictures=16, unet_steps=2, unet_batch=4, clip_image_steps=3, dino_steps=3,
                         tower_groups=2, tower_k=2, tower_supervised_steps=1, tower_big_steps=1, check_pictures=16,
                         check_prompts=2, probe_pictures=4)
    report = pretrain(cfg, ["--out", cfg.out])
    assert set(report["stages"]) == {"vae", "clip", "unet", "clip_image", "dino"}
    assert json.loads((tmp_path / "toy" / "probe.json").read_text())["n"] == 4
    assert all(s["wall_s"] > 0 and s["cpu_s"] > 0 for s in report["stages"].values())
    sd = load_sd(tmp_path / "toy" / "sd")
    assert sd.vae.cfg.scaling_factor == report["stages"]["vae"]["scaling_factor"]
    load_clip(tmp_path / "toy" / "clip"), load_dino(tmp_path / "toy" / "dino")
    log = (tmp_path / "toy" / "pretrain.log").read_text()
    assert "command: python -m tinyrpo.toy pretrain --out" in log and "done:" in log
    machine = report["machine"]  # the files depend on the processor's kernels: the record names it
    assert machine["torch"] == torch.__version__ and machine["cpu"] and f"threads, {machine['cpu']}," in log
    # a second run finds every stage done and only re-exports
    before = json.loads((tmp_path / "toy" / "pretrain.json").read_text())["stages"]
    pretrain(cfg, [])
    assert json.loads((tmp_path / "toy" / "pretrain.json").read_text())["stages"] == before
    assert "vae: done before" in (tmp_path / "toy" / "pretrain.log").read_text()
    assert np.isfinite(report["total"]["cpu_s"])


def test_stages_side_by_side_make_the_files_stages_one_after_another_make(tmp_path, monkeypatch):
    """Each stage of a group, run in its own process beside the other, gives the very weights it gives run alone
    in this process (the same initial weights, seeds, inputs from the earlier stages, threads)."""
    from tinyrpo.toy import pretrain as P
    cfg = dict(threads=1, vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=8, unet_pictures=16, unet_steps=2,
               unet_batch=4, clip_image_steps=3, dino_steps=3, tower_groups=2, tower_k=2, tower_supervised_steps=1,
               tower_big_steps=1, check_pictures=16, check_prompts=2, probe_pictures=4)
    P.pretrain(P.PretrainConfig(out=str(tmp_path / "together"), **cfg))
    monkeypatch.setattr(P, "GROUPS", tuple((name,) for name in P.STAGES))
    report = P.pretrain(P.PretrainConfig(out=str(tmp_path / "apart"), **cfg))
    assert set(report["groups"]) == set(P.STAGES)
    for name in P.STAGES:
        a, b = (torch.load(P.stage_path(tmp_path / run, name), weights_only=True)["weights"]
                for run in ("together", "apart"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.filterwarnings("ignore:.*px")  # 32-px pictures are below the 256-px advice for photos
def test_evaluate_reports_exact_metrics_for_a_toy_subject(tmp_path, monkeypatch, capsys):
    """`python -m tinyrpo.evaluate --subject refs/toy`: the toy weights, prompts and resolution come from
    subject.json, and the exact metrics stand beside DINO / CLIP-I / CLIP-T, equal to score_images'."""
    from tinyrpo.dreambench import fill
    from tinyrpo.evaluate import main
    from tinyrpo.toy.metrics import score_images
    monkeypatch.chdir(ROOT)  # subject.json names the weights relative to the repository root
    out = tmp_path / "eval"
    assert main(["--subject", "refs/toy", "--images-per-prompt", "1", "--sample-steps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    r = json.loads((out / "eval.json").read_text())
    meta = json.loads((ROOT / "refs" / "toy" / "subject.json").read_text())
    assert (r["models"]["weights"], r["models"]["eval_clip"], r["models"]["dino"]) == (
        "weights/toy/sd", "weights/toy/clip", "weights/toy/dino")
    assert r["settings"]["resolution"] == 32 and r["settings"]["prompt_set"] == "subject.json"
    prompts = [row["prompt"] for row in r["prompts"]]
    assert prompts == fill(meta["eval_prompts"], "sks", "toy")
    images = [Image.open(out / row["grid"]).convert("RGB") for row in r["prompts"]]
    s = score_images(images, prompts, SUBJECTS["toy"])
    for row, mine in zip(r["prompts"], s["per_image"]):
        assert row["identity"] == pytest.approx(mine["identity"]) and row["fidelity"] == pytest.approx(mine["fidelity"])
        assert row["leak"] is None if mine["leak"] != mine["leak"] else row["leak"] == mine["leak"]
    assert r["overall"]["identity"] == pytest.approx(s["identity"]) and r["overall"]["leak"] == pytest.approx(s["leak"])
    assert "| identity | fidelity | leak |" in capsys.readouterr().out


def test_a_new_image_tower_keeps_the_text_tower():
    """Stage 4 swaps the 64-wide image tower for the shipped 96-wide one; the text tower (the SD text encoder
    the U-Net was trained on), its projection and the temperature are copied, not re-drawn."""
    first = models.new_models()["clip"]
    assert first.config == models.FIRST_CLIP
    new = models.with_new_image_tower(first)
    assert new.config == models.CLIP and new.config.vision.hidden_size == 96
    for a, b in ((first.text_model, new.text_model), (first.text_projection, new.text_projection)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(first.logit_scale, new.logit_scale)
    ids = torch.tensor([[49406, 320, 49407]])
    assert torch.equal(first.encode_text(ids), new.encode_text(ids))


@pytest.mark.parametrize("flag, value, message", [
    ("--clip-image-near", "2", "--clip-image-near is a share between 0 and 1"),
    ("--clip-image-steps", "-5", "--clip-image-steps must be positive"),
    ("--tower-k", "1", "--tower-k must be at least 2"),
    ("--tower-big-steps", "-1", "--tower-big-steps must be 0 or more"),
])
def test_pretrain_refuses_values_no_stage_can_use(tmp_path, flag, value, message):
    """One sentence before an hour of pretraining starts, and nothing written."""
    from tinyrpo.toy.__main__ import main
    with pytest.raises(UserError, match=message):
        main(["pretrain", "--out", str(tmp_path / "toy"), flag, value])
    assert not (tmp_path / "toy").exists()
    PretrainConfig().check()  # the defaults pass
