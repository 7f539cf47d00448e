"""tinyrpo.export and LoRA files of other tools: every exported file, loaded by diffusers, computes what tinyrpo's
fine-tuned model computes; sample.py takes kohya / diffusers LoRA files and the exported single file; the
real-size SD v1.5 names and shapes match the public layouts (meta device). Tiny random weights on the CPU."""
import copy
import errno
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
from tests.fixtures import TINY_UNET, make_tiny_sd
from tests.util import max_rel_err, parse_a1111
from tinyrpo import export as E
from tinyrpo.clip import CLIPTextConfig, CLIPTextModel
from tinyrpo.errors import run_cli
from tinyrpo.formats import exports
from tinyrpo.formats.checkpoint import BEST, apply_checkpoint, save_checkpoint
from tinyrpo.formats.layouts import compvis_single_file
from tinyrpo.formats.lora_files import apply_lora, kohya_name, to_kohya
from tinyrpo.formats.weights import empty_model, load_sd
from tinyrpo.lora import add_lora, lora_config, lora_state_dict, merge_lora, set_lora_scale
from tinyrpo.pipeline import DTYPES
from tinyrpo.schedulers import SchedulerConfig, make_betas
from tinyrpo.unet import UNet, UNetConfig
from tinyrpo.vae import AutoencoderKL, VAEConfig

MANIFESTS = Path(__file__).parent / "manifests"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base model, and two "runs": dog/ with a whole fine-tuned U-Net, cat/ with a LoRA (rank 4, α 2)."""
    root = tmp_path_factory.mktemp("export")
    folder = make_tiny_sd(root / "sd")
    sd = load_sd(folder)
    meta = {"base": str(folder), "base_fingerprint": sd.fingerprint, "token": "sks", "class_noun": "dog", "step": 40}
    g = torch.Generator().manual_seed(0)
    tuned = copy.deepcopy(sd.unet)
    tuned.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.unet.state_dict().items()})
    save_checkpoint(root / "dog" / BEST, tuned.state_dict(), meta)
    adapted = copy.deepcopy(sd.unet)
    add_lora(adapted, 4, alpha=2.0)
    with torch.no_grad():
        for t in lora_state_dict(adapted).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    save_checkpoint(root / "cat" / BEST, lora_state_dict(adapted), {**meta, "class_noun": "cat"},
                    lora=lora_config(adapted))
    return {"root": root, "sd": folder, "single": make_tiny_sd(root / "single", "single"), "base": sd,
            "tuned": tuned.eval(), "adapted": adapted.eval()}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 800]),
            torch.randn(2, 77, TINY_UNET.cross_attention_dim, generator=g))


@torch.no_grad()
def assert_unet(theirs, ours, tol=TOL):
    """A diffusers U-Net (or a tinyrpo one) against tinyrpo's model on the same input."""
    x, t, c = inputs()
    out = theirs(x, t, encoder_hidden_states=c)
    out = out.sample if hasattr(out, "sample") else out
    assert max_rel_err(out, ours(x, t, c)) <= tol


def out_of(runs, run, fmt, tmp_path, **kw) -> Path:
    ext = "" if fmt == "diffusers" else ".safetensors"
    return exports.export_checkpoint(runs["root"] / run, fmt, out=tmp_path / f"{run}-{fmt}{ext}", **kw)


def pipeline(runs):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(runs["sd"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Each format, loaded by diffusers


@pytest.mark.parametrize("run", ["dog", "cat"], ids=["full", "lora-merged"])
def test_single_file_loads_in_diffusers_from_single_file(runs, tmp_path, run):
    """diffusers' StableDiffusionPipeline.from_single_file (its CompVis converter; the config from the base folder,
    offline) reads the export as tinyrpo's model: the fine-tuned U-Net, or the base with the LoRA merged."""
    diffusers = pytest.importorskip("diffusers")
    path = out_of(runs, run, "single-file", tmp_path)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(runs["sd"]),
                                                              local_files_only=True, safety_checker=None)
    ours = runs["tuned"] if run == "dog" else runs["adapted"]
    assert_unet(pipe.unet, ours)
    with torch.no_grad():  # VAE and text encoder are the base model's
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        assert max_rel_err(pipe.vae.decode(z).sample, runs["base"].vae.decode(z)) <= TOL
        ids = runs["base"].tokenizer(["a photo of sks dog"])
        assert max_rel_err(pipe.text_encoder(ids).last_hidden_state, runs["base"].text_encoder(ids)) <= TOL
    with safe_open(str(path), "pt") as f:  # the file's header names the fine-tune; fp32 by default
        assert f.metadata()["tinyrpo.token"] == "sks" and f.get_tensor("model.diffusion_model.out.2.bias").dtype == \
            torch.float32


@pytest.mark.parametrize("run", ["dog", "cat"], ids=["full", "lora-merged"])
def test_diffusers_folder_loads_in_from_pretrained(runs, tmp_path, run):
    """The folder, here in fp16, holds the fine-tuned (or LoRA-merged) model rounded to fp16, and the base
    tokenizer."""
    diffusers = pytest.importorskip("diffusers")
    path = out_of(runs, run, "diffusers", tmp_path, precision="fp16")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, torch_dtype=torch.float32)
    ours = copy.deepcopy(runs["tuned"] if run == "dog" else runs["adapted"])
    merge_lora(ours)  # (nothing to merge for the full run)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.half().float())
    assert_unet(pipe.unet, ours)
    prompt = "a photo of sks dog"
    assert pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids == \
        runs["base"].tokenizer([prompt])[0].tolist()
    assert pipe.unet.config.sample_size == TINY_UNET.sample_size and path.stat().st_mode & 0o755 == 0o755


@pytest.mark.parametrize("fmt", ["lora-diffusers", "lora-kohya"])
def test_lora_files_load_in_diffusers(runs, tmp_path, fmt):
    """pipe.load_lora_weights reads both files (the kohya one through diffusers' own kohya converter) and gives
    the U-Net tinyrpo trained, at scale 1 and at a smaller one."""
    pipe = pipeline(runs)
    path = out_of(runs, "cat", fmt, tmp_path, precision="fp32")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="cat")
    assert_unet(pipe.unet, runs["adapted"])
    pipe.set_adapters(["cat"], adapter_weights=[0.4])
    ours = copy.deepcopy(runs["adapted"])
    set_lora_scale(ours, 0.4)
    assert_unet(pipe.unet, ours)


def test_kohya_file_names_and_header(runs, tmp_path):
    path = out_of(runs, "cat", "lora-kohya", tmp_path)
    tensors = load_file(path)
    name = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"  # sd-scripts' SD v1 naming
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32) and tensors[f"{name}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{name}.alpha"].item() == 2.0 and tensors[f"{name}.lora_down.weight"].dtype == torch.float16
    assert len(tensors) == 3 * 48
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2.0"
    assert header["ss_base_model_version"] == "sd_v1"


# ---------------------------------------------------------------------------------------------------------
# Other tools' LoRA files in tinyrpo (sample.py --lora)


@pytest.mark.parametrize("fmt", ["lora-diffusers", "lora-kohya", "tinyrpo"])
def test_apply_lora_files(runs, tmp_path, fmt):
    path = runs["root"] / "cat" / BEST if fmt == "tinyrpo" else out_of(runs, "cat", fmt, tmp_path, precision="fp32")
    sd = load_sd(runs["sd"])
    info = apply_lora(sd, path, scale=0.7)
    assert info["layers"] == 48 and info["networks"] == ["unet"]
    ours = copy.deepcopy(runs["adapted"])
    set_lora_scale(ours, 0.7)
    assert_unet(sd.unet, ours)


@torch.no_grad()
def test_kohya_file_with_text_encoder_and_compvis_names(runs, tmp_path):
    """A kohya file as other SD v1 trainers write it: U-Net layers under their CompVis names (here proj_in, a
    1x1 conv, and a resnet's time projection), and text-encoder layers (lora_te_*). The U-Net against diffusers'
    load_lora_weights of the diffusers-named file; the text encoder against the update written by hand
    (diffusers 0.42 with transformers 5 drops kohya text-encoder layers: its converter keeps the text_model.
    prefix that transformers 5's CLIPTextModel no longer has)."""
    pipe = pipeline(runs)
    g = torch.Generator().manual_seed(4)
    C = TINY_UNET.block_out_channels[0]
    layers = {  # kohya name (diffusers naming) -> CompVis naming, down shape, up shape
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("lora_unet_input_blocks_1_1_proj_in", (2, C, 1, 1),
                                                         (C, 2, 1, 1)),
        "lora_unet_up_blocks_1_resnets_2_time_emb_proj": ("lora_unet_output_blocks_5_0_emb_layers_1", (2, 4 * C),
                                                          (C, 2)),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (None, (2, 128), (128, 2)),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (None, (2, 128), (256, 2)),
    }
    diffusers_named, compvis_named, by_hand = {}, {}, {}
    for name, (compvis, down, up) in layers.items():
        t = {"lora_down.weight": torch.randn(down, generator=g) * 0.3,
             "lora_up.weight": torch.randn(up, generator=g) * 0.3, "alpha": torch.tensor(1.0)}
        diffusers_named.update({f"{name}.{k}": v for k, v in t.items()})
        compvis_named.update({f"{compvis or name}.{k}": v for k, v in t.items()})
        if name.startswith("lora_te_"):
            by_hand[name] = 0.5 * t["lora_up.weight"] @ t["lora_down.weight"]  # (α/r) B A, α = 1, r = 2
    save_file(diffusers_named, tmp_path / "a.safetensors")
    save_file(compvis_named, tmp_path / "b.safetensors")
    pipe.load_lora_weights(str(tmp_path), weight_name="a.safetensors")
    text = copy.deepcopy(runs["base"].text_encoder)
    layers = text.text_model.encoder.layers
    layers[1].self_attn.v_proj.weight += by_hand["lora_te_text_model_encoder_layers_1_self_attn_v_proj"]
    layers[0].mlp.fc1.weight += by_hand["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    for file in ("a.safetensors", "b.safetensors"):
        sd = load_sd(runs["sd"])
        assert apply_lora(sd, tmp_path / file)["networks"] == ["text_encoder", "unet"]
        assert_unet(pipe.unet, sd.unet)
        ids = sd.tokenizer(["a photo of sks dog"])
        assert max_rel_err(sd.text_encoder(ids), text(ids)) <= TOL
        assert max_rel_err(sd.text_encoder(ids), runs["base"].text_encoder(ids)) > 1e-2  # the text LoRA shows


@pytest.mark.parametrize("tensors, says", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 128)}, "Stable Diffusion XL"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.ones(2, 2)}, "LyCORIS"),
    ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 2)}, "does not have"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32, 1, 1)}, "only its down"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 7, 1, 1),
      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2, 1, 1)}, "in that shape"),
    ({"first_stage_model.decoder.conv_in.weight": torch.ones(2)}, "not a LoRA tensor name"),
], ids=["sdxl", "lycoris", "unknown-layer", "half-pair", "shape", "not-a-lora"])
def test_bad_lora_files(runs, tmp_path, capsys, tensors, says):
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, ["--weights", str(runs["sd"]), "--lora", str(tmp_path / "x.safetensors"), "--prompt", "a",
                              "--sample-steps", "1", "--images-per-prompt", "1", "--height", "32", "--width", "32",
                              "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# sample.py with exported files


def test_sample_with_exported_single_file_and_lora(runs, tmp_path):
    """--weights EXPORTED.safetensors gives the images --ckpt gives; --lora EXPORTED-KOHYA gives the images of the
    LoRA checkpoint; the PNGs name the file A1111 would load, by A1111's hash."""
    single = out_of(runs, "dog", "single-file", tmp_path)
    kohya = out_of(runs, "cat", "lora-kohya", tmp_path, precision="fp32")
    common = ["--prompt", "a photo of sks dog", "--sample-steps", "2", "--images-per-prompt", "1", "--height", "32", "--width", "32",
              "--device", "cpu", "--no-progress", "--overwrite"]

    def png(*args):
        return sample.main([*map(str, args), *common])[0]

    a, b = png("--weights", single, "--out", tmp_path / "a"), png("--ckpt", runs["root"] / "dog" / BEST, "--out",
                                                                  tmp_path / "b")
    assert (Image.open(a).tobytes() == Image.open(b).tobytes())
    params = parse_a1111(Image.open(a).text["parameters"])
    assert params["Model"] == "dog-single-file"
    assert params["Model hash"] == hashlib.sha256(single.read_bytes()).hexdigest()[:10]

    c = png("--weights", runs["sd"], "--lora", kohya, "--lora-scale", 0.6, "--out", tmp_path / "c")
    d = png("--ckpt", runs["root"] / "cat" / BEST, "--lora-scale", 0.6, "--out", tmp_path / "d")
    diff = abs(torch.tensor(list(Image.open(c).tobytes())).int() - torch.tensor(list(Image.open(d).tobytes())).int())
    assert diff.max() <= 2  # fp32 factors, merged in either order: float rounding only
    params = parse_a1111(Image.open(c).text["parameters"])
    tensor_bytes = kohya.read_bytes()[8 + int.from_bytes(kohya.read_bytes()[:8], "little"):]
    assert params["Lora hashes"] == f"cat-lora-kohya: {hashlib.sha256(tensor_bytes).hexdigest()[:12]}"
    assert "Model hash" not in params and params["Model"] == "sd"  # a diffusers folder: no file to hash


# ---------------------------------------------------------------------------------------------------------
# Real-size SD v1.5 names and shapes, on the meta device


def manifest(name: str) -> dict:
    m = json.loads((MANIFESTS / name).read_text())
    return {**m["tensors"], **m.get("extra", {})}


def test_sd15_single_file_layout():
    """The export of an SD v1.5-size model has exactly v1-5-pruned-emaonly's tensor names and shapes (the EMA
    bookkeeping of non-emaonly files aside)."""
    unet, vae = empty_model(UNet, UNetConfig()), empty_model(AutoencoderKL, VAEConfig())
    text = empty_model(CLIPTextModel, CLIPTextConfig())
    state = compvis_single_file(unet.state_dict(), unet.cfg, vae.state_dict(), vae.cfg, text.state_dict(),
                                make_betas(SchedulerConfig()))
    want = {k: v for k, v in manifest("sd15_single_file.json").items() if not k.startswith("model_ema.")}
    assert {k: list(t.shape) for k, t in state.items()} == want


def test_sd15_lora_names_are_what_diffusers_and_kohya_read():
    """At SD v1.5 size: diffusers' kohya converter maps every exported kohya name onto a layer of diffusers'
    UNet2DConditionModel of the right shape, and the diffusers-format names are that model's module paths."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from tests.test_weights import SD15_UNET_JSON
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(SD15_UNET_JSON)
    ours = empty_model(UNet, UNetConfig())
    add_lora(ours, 16)
    state = lora_state_dict(ours)
    assert len(state) == 2 * 128  # 16 transformer blocks x 2 attentions x 4 projections
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(to_kohya(state, 16.0))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    modules = dict(theirs.named_modules())
    for k, t in peft.items():
        path, ab = k.rsplit(".", 2)[0], k.split(".")[-2]
        layer = modules[path]
        assert t.shape == ((16, layer.in_features) if ab == "lora_A" else (layer.out_features, 16)), k
    assert {k.rsplit(".", 2)[0] for k in peft} == {k.rsplit(".", 2)[0] for k in state}
    assert kohya_name("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"


# ---------------------------------------------------------------------------------------------------------
# Errors


def cli_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(E.main, [str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_export_errors(runs, tmp_path, capsys):
    assert "is a whole fine-tuned U-Net, not a LoRA" in cli_error(capsys, [runs["root"] / "dog", "--format",
                                                                             "lora-kohya"])
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"keep me")
    assert "already exists; pass --overwrite" in cli_error(capsys, [runs["root"] / "dog", "--out", existing])
    assert existing.read_bytes() == b"keep me"
    assert "holds no best.safetensors" in cli_error(capsys, [tmp_path])
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04")
    assert "resumable state" in cli_error(capsys, [tmp_path / "last.pt"])
    assert "name it *.safetensors" in cli_error(capsys, [runs["root"] / "cat", "--format", "lora-kohya", "--out",
                                                         tmp_path / "cat.ckpt"])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_cli_default_outputs(runs, tmp_path, capsys):
    run = tmp_path / "cat"
    run.mkdir()
    (run / BEST).write_bytes((runs["root"] / "cat" / BEST).read_bytes())
    assert E.main([str(run), "--format", "lora-kohya"]) == run / "cat-lora.safetensors"
    assert "wrote " in capsys.readouterr().out
    assert E.main([str(run / BEST), "--format", "lora-diffusers"]) == run / "cat-lora-diffusers.safetensors"
    assert load_file(run / "cat-lora.safetensors")["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
                                                   ".alpha"].item() == 2.0
    sd = load_sd(runs["sd"])
    assert apply_checkpoint(sd, run / BEST)["class_noun"] == "cat"


# ---------------------------------------------------------------------------------------------------------
# A model that is not SD v1.5's shape: what a config-less single file cannot tell travels in its header


ODD = {  # config.json edits that change the computation but no tensor shape, so a single file cannot see them
    "unet": {"attention_head_dim": 4, "sample_size": 16},  # SD v1: 8 heads; latents of 16: 32 px (VAE factor 2)
    "vae": {"scaling_factor": 0.5},  # SD v1: 0.18215
    "text_encoder": {"num_attention_heads": 4},  # a config-less file reads width / 64 = 2
    "scheduler": {"beta_end": 0.02},  # SD v1: 0.012
}


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """The tiny SD with ODD's configs (a toy-world-like base), and a run fine-tuned from it."""
    root = tmp_path_factory.mktemp("odd")
    folder = make_tiny_sd(root / "sd")
    for sub, edits in ODD.items():
        config = folder / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")
        config.write_text(json.dumps({**json.loads(config.read_text()), **edits}))
    sd = load_sd(folder)
    g = torch.Generator().manual_seed(3)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.unet.state_dict().items()}
    save_checkpoint(root / "odd" / BEST, tuned, {"base": str(folder), "base_fingerprint": sd.fingerprint,
                                                 "token": "sks", "class_noun": "toy", "step": 5})
    return {"root": root, "sd": folder, "run": root / "odd"}


def test_non_sd15_exports_sample_as_the_checkpoint(odd, tmp_path, capsys):
    """sample.py on the single-file export and on the diffusers export of a model with other heads, VAE scaling,
    sample size and schedule than SD v1.5 gives, pixel for pixel, the images of the checkpoint itself, at the
    model's own size; the single file says in one line that its header set the architecture."""
    single = exports.export_checkpoint(odd["run"], "single-file", out=tmp_path / "odd.safetensors")
    folder = exports.export_checkpoint(odd["run"], "diffusers", out=tmp_path / "odd-diffusers")
    common = ["--prompt", "a sks toy on a red background", "--sample-steps", "3", "--images-per-prompt", "1", "--device", "cpu",
              "--no-progress", "--overwrite", "--seed", "1"]

    def pixels(*args):
        capsys.readouterr()
        image = Image.open(sample.main([*map(str, args), *common])[0])
        return image.size, image.tobytes(), capsys.readouterr().err

    size, want, err = pixels("--ckpt", odd["run"] / BEST, "--out", tmp_path / "a")
    assert size == (32, 32) and "note:" not in err
    assert pixels("--weights", folder, "--out", tmp_path / "b")[:2] == (size, want)
    size_single, got, err = pixels("--weights", single, "--out", tmp_path / "c")
    assert (size_single, got) == (size, want)
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(single) in notes[0], err
    for fact in ("unet num_heads=4", "unet sample_size=16", "vae scaling_factor=0.5", "text_encoder num_heads=4",
                 "scheduler beta_end=0.02"):
        assert fact in notes[0], notes[0]


def test_public_single_file_without_header_loads_as_before(odd, tmp_path, capsys):
    """The same tensors without tinyrpo's header entries: read as a public file is, with SD v1's rules, silently."""
    single = exports.export_checkpoint(odd["run"], "single-file", out=tmp_path / "odd.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(single), plain, metadata={"format": "pt"})
    capsys.readouterr()
    sd = load_sd(plain)
    assert "note:" not in capsys.readouterr().err
    assert (sd.unet.cfg.num_heads, sd.unet.cfg.sample_size, sd.vae.cfg.scaling_factor) == (8, 64, 0.18215)
    assert sd.text_encoder.config.num_heads == 2 and sd.scheduler_config.beta_end == 0.012


def test_bad_architecture_header_is_one_line(odd, tmp_path, capsys):
    single = exports.export_checkpoint(odd["run"], "single-file", out=tmp_path / "odd.safetensors")
    with safe_open(str(single), "pt") as f:
        header = f.metadata()
    save_file(load_file(single), tmp_path / "bad.safetensors", {**header, "tinyrpo.vae_config": "{not json"})
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, ["--weights", str(tmp_path / "bad.safetensors"), "--prompt", "a", "--sample-steps", "1",
                              "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "tinyrpo.vae_config is not a JSON config" in err


# ---------------------------------------------------------------------------------------------------------
# The single file's non-weights, by LatentDiffusion's own formulas


def ldm_schedule() -> dict:
    """ldm/models/diffusion/ddpm.py register_schedule for SD v1 (v1-inference.yaml: linear_start 0.00085,
    linear_end 0.012, 1000 steps, "linear" = linear in sqrt(β)), in float64 numpy as it computes them."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    a = np.cumprod(alphas, axis=0)
    a_prev = np.append(1.0, a[:-1])
    var = betas * (1.0 - a_prev) / (1.0 - a)  # v_posterior = 0
    return {"betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "sqrt_alphas_cumprod": np.sqrt(a),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - a), "log_one_minus_alphas_cumprod": np.log(1.0 - a),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / a), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / a - 1),
            "posterior_variance": var, "posterior_log_variance_clipped": np.log(np.maximum(var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(a_prev) / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * np.sqrt(alphas) / (1.0 - a)}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_file_schedule_and_integer_tensors(runs, tmp_path, dtype):
    """The schedule buffers hold LatentDiffusion's values (ᾱ_prev starts at 1), position_ids stays int64 0..76 in
    either dtype, and every other tensor is in the dtype asked for."""
    path = out_of(runs, "dog", "single-file", tmp_path, precision=dtype)
    want = ldm_schedule()
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ids = tensors.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
    floating = {torch.float32: "fp32", torch.float16: "fp16"}
    assert {floating.get(t.dtype) for t in tensors.values()} == {dtype}
    for name, value in want.items():
        got = tensors[name]
        assert got.shape == (1000,) and got.dtype == DTYPES[dtype], name
        if dtype == "fp32":
            np.testing.assert_allclose(got.numpy(), value, rtol=2e-5, atol=0, err_msg=name)
    assert tensors["alphas_cumprod_prev"][0].item() == 1.0 and tensors["posterior_variance"][0].item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# A full disk, a read-only target, Ctrl-C: one line, the earlier export intact, nothing half-written left

FORMATS_OUT = {"single-file": "x.safetensors", "diffusers": "x-diffusers", "lora-kohya": "x-lora.safetensors",
               "lora-diffusers": "x-lora-diffusers.safetensors"}


def old_export(out: Path) -> dict:
    """An earlier export at `out` (a file, or a folder with model_index.json); returns its content to compare."""
    if out.suffix == ".safetensors":
        out.write_bytes(b"the old export")
    else:
        (out / "unet").mkdir(parents=True)
        (out / "model_index.json").write_text("{}")
        (out / "unet" / "config.json").write_text('{"old": 1}')
    return tree(out)


def tree(path: Path) -> dict:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_of(fmt: str) -> str:
    return "cat" if fmt.startswith("lora") else "dog"


@pytest.mark.parametrize("fmt", list(FORMATS_OUT))
def test_export_to_a_full_disk(runs, small_disk, capsys, fmt):
    """A real 64 KiB tmpfs, filled up but for two pages: one line naming the output, the old export as it was."""
    out = small_disk / FORMATS_OUT[fmt]
    before = old_export(out)
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * ((free.f_bavail - 2) * free.f_frsize))
    err = cli_error(capsys, [runs["root"] / run_of(fmt), "--format", fmt, "--out", out, "--overwrite"])
    assert f"cannot write {out}: no space left on the device" in err
    assert tree(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == sorted([out.name, "filler"])  # no temporary left


@pytest.mark.parametrize("fmt", list(FORMATS_OUT))
@pytest.mark.parametrize("sub", ["", "new/"], ids=["folder", "subfolder"])
def test_export_to_a_read_only_folder(runs, read_only_folder, capsys, fmt, sub):
    out = read_only_folder / f"{sub}{FORMATS_OUT[fmt]}"
    err = cli_error(capsys, [runs["root"] / run_of(fmt), "--format", fmt, "--out", out])
    assert f"cannot write {out}: " in err and ("read-only" in err or "permission denied" in err)
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize("fmt", list(FORMATS_OUT))
@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_export_failing_mid_write(runs, tmp_path, monkeypatch, capsys, fmt, failure):
    """On any machine: the write stops halfway through a tensor file (for the diffusers folder, the second one,
    after the U-Net's is complete) with ENOSPC or Ctrl-C. The earlier export stays, nothing else is left."""
    import safetensors.torch
    out = tmp_path / FORMATS_OUT[fmt]
    before = old_export(out)
    real, calls = safetensors.torch.save_file, []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if fmt == "diffusers" and len(calls) == 1:
            return real(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if failure == "disk-full" else KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    args = [str(a) for a in [runs["root"] / run_of(fmt), "--format", fmt, "--out", out, "--overwrite"]]
    if failure == "disk-full":
        assert f"cannot write {out}: no space left" in cli_error(capsys, args)
    else:
        with pytest.raises(SystemExit) as e:
            run_cli(E.main, args)
        assert e.value.code == 130
    assert len(calls) == (2 if fmt == "diffusers" else 1)
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_ctrl_c_while_the_diffusers_folders_swap(runs, tmp_path, monkeypatch):
    """A real SIGINT arriving between the two renames (old folder aside, new one in) is held until both are done:
    the new export is complete under its name, no folder is left aside, then the interrupt is delivered."""
    out = tmp_path / "x-diffusers"
    old_export(out)
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        if Path(src) == out:  # the old folder has just gone aside
            # raise_signal delivers to this (the main) thread at once; os.kill(getpid()) may land on one of
            # torch's threads and reach Python only after the swap (seen once in a loaded suite run)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(exports.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        exports.export_checkpoint(runs["root"] / "dog", "diffusers", out=out, overwrite=True)
    assert torch.equal(load_sd(out).unet.conv_out.weight, runs["tuned"].conv_out.weight)  # the new export, whole
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_overwrite_never_replaces_what_the_export_needs(runs, tmp_path, capsys):
    """--overwrite replaces an earlier export only: not the checkpoint, its run folder, the base model, a folder
    that is not a diffusers export, nor a folder where a file goes."""
    cat, dog = runs["root"] / "cat", runs["root"] / "dog"
    kept = {p: tree(p) for p in (cat, dog)}
    assert "would replace the checkpoint" in cli_error(capsys, [cat, "--format", "lora-kohya", "--out", cat / BEST,
                                                                "--overwrite"])
    assert "would replace the checkpoint" in cli_error(capsys, [dog, "--format", "diffusers", "--out", dog,
                                                                "--overwrite"])
    other = tmp_path / "photos"
    (other / "a.png").parent.mkdir()
    (other / "a.png").write_bytes(b"png")
    assert "not a diffusers model folder" in cli_error(capsys, [dog, "--format", "diffusers", "--out", other,
                                                                "--overwrite"])
    folder = tmp_path / "f.safetensors"
    folder.mkdir()
    assert "is a folder" in cli_error(capsys, [dog, "--out", folder, "--overwrite"])
    base = tmp_path / "base.safetensors"
    base.write_bytes(runs["single"].read_bytes())
    assert "is the base model itself" in cli_error(capsys, [dog, "--weights", base, "--out", base, "--overwrite"])
    assert base.read_bytes() == runs["single"].read_bytes() and (other / "a.png").exists() and folder.is_dir()
    assert {p: tree(p) for p in (cat, dog)} == kept


def test_a_held_ctrl_c_is_delivered_whatever_handler_was_there():
    """The held interrupt reaches the caller after the swap: through a Python handler, or as KeyboardInterrupt
    when the previous handler was SIG_DFL; SIG_IGN drops it, as it would have been."""
    before = signal.getsignal(signal.SIGINT)
    try:
        for previous, raises in ((signal.default_int_handler, True), (signal.SIG_DFL, True), (signal.SIG_IGN, False)):
            signal.signal(signal.SIGINT, previous)
            done = []
            try:
                with exports.interrupts_held():
                    signal.raise_signal(signal.SIGINT)
                    done.append("swap finished")
            except KeyboardInterrupt:
                done.append("interrupted")
            assert done == (["swap finished", "interrupted"] if raises else ["swap finished"]), previous
            assert signal.getsignal(signal.SIGINT) == previous
    finally:
        signal.signal(signal.SIGINT, before)
