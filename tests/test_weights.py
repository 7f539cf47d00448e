"""tinyrpo.formats.weights: every public layout maps onto tinyrpo's modules at the real sizes, the loaded values agree
with the reference loaders (diffusers' own CompVis converter, diffusers / transformers from_pretrained), and
every bad input ends in one clear WeightsError."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.compvis import LDMConfig, single_file_shapes
from tests.fixtures import (TINY_DINO, TINY_TEXT, TINY_UNET, TINY_VAE, clip_text_config_json, dino_to_original,
                            make_tiny_clip, make_tiny_dino, make_tiny_sd)
from tests.util import max_rel_err, randomize_
from tinyrpo.clip import CLIP_VIT_B16, CLIP_VIT_B32, CLIP_VIT_L14, CLIPTextConfig
from tinyrpo.dino import DINOConfig
from tinyrpo.formats import weights as W
from tinyrpo.formats.weights import WeightsError, load_clip, load_dino, load_sd
from tinyrpo.schedulers import SchedulerConfig
from tinyrpo.unet import UNetConfig
from tinyrpo.vae import VAEConfig

MANIFESTS = Path(__file__).parent / "manifests"
# Loaded models are compared with the reference libraries' in float64, where the honest error is ~1e-15 (measured
# on this CPU: 0 .. 2e-15) and any tensor in the wrong place shows at 1e-3 or more.
TOL = 1e-12


def meta_state(name: str, extra: bool = False) -> dict:
    """A manifest as a state dict of meta tensors: real names and shapes, no memory."""
    m = json.loads((MANIFESTS / name).read_text())
    shapes = {**m["tensors"], **(m.get("extra", {}) if extra else {})}
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


# SD v1.5's unet/config.json and vae/config.json (stable-diffusion-v1-5/stable-diffusion-v1-5), text_encoder's
SD15_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4}
SD15_TEXT_JSON = clip_text_config_json(CLIPTextConfig())


# ---------------------------------------------------------------------------------------------------------
# Layout coverage at the real sizes, on the meta device, through the loader's own remap/check code


def test_sd15_single_file_layout():
    state = meta_state("sd15_single_file.json", extra=True)
    # non-"emaonly" files also carry model_ema.<name without dots> copies of the U-Net: ignored
    state.update({"model_ema." + k[len("model."):].replace(".", ""): t for k, t in list(state.items())[:50]
                  if k.startswith("model.diffusion_model.")})
    parts = W.sd_single_file_parts(state, "sd15.safetensors")
    for part in parts.values():
        part.build("meta")  # raises unless every tensor maps onto a parameter of its shape and vice versa
    assert parts["unet"].cfg == UNetConfig()
    assert parts["vae"].cfg == VAEConfig()
    assert parts["text_encoder"].cfg == CLIPTextConfig()
    W.check_sd_parts(parts, "sd15.safetensors")


@pytest.mark.parametrize("vae_manifest", ["sd15_diffusers_vae.json", "sd15_diffusers_vae_legacy_attn.json"])
def test_sd15_diffusers_layout(vae_manifest):
    unet = W.unet_part(meta_state("sd15_diffusers_unet.json"), SD15_UNET_JSON, "unet/x.safetensors")
    vae = W.vae_part(meta_state(vae_manifest), SD15_VAE_JSON, "vae/x.safetensors")
    text = W.text_part(meta_state("sd15_diffusers_text_encoder.json"), SD15_TEXT_JSON, "text_encoder/model.safetensors")
    for part in (unet, vae, text):
        part.build("meta")
    assert (unet.cfg, vae.cfg, text.cfg) == (UNetConfig(), VAEConfig(), CLIPTextConfig())


def _b16(state):  # openai/clip-vit-base-patch16: B/32 with 16-pixel patches, so 14 x 14 + 1 positions
    state["vision_model.embeddings.patch_embedding.weight"] = torch.empty(768, 3, 16, 16, device="meta")
    state["vision_model.embeddings.position_embedding.weight"] = torch.empty(197, 768, device="meta")


@pytest.mark.parametrize("manifest, edit, expected", [("clip_vit_b32_hf.json", None, CLIP_VIT_B32),
                                                      ("clip_vit_b32_hf.json", _b16, CLIP_VIT_B16),
                                                      ("clip_vit_l14_hf.json", None, CLIP_VIT_L14)],
                         ids=["B/32", "B/16", "L/14"])
def test_clip_layout_and_inferred_config(manifest, edit, expected):
    state = meta_state(manifest)
    state["text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long, device="meta")  # ignored
    if edit:
        edit(state)
    part = W.clip_part(state, None, manifest)
    part.build("meta")
    assert part.cfg == expected


@pytest.mark.parametrize("manifest", ["dino_vits16_hf.json", "dino_vits16_original.json"])
def test_dino_layout_and_inferred_config(manifest):
    part = W.dino_part(meta_state(manifest), None, manifest)
    part.build("meta")
    assert part.cfg == DINOConfig()
    if "hf" in manifest:  # with facebook/dino-vits16's config.json its eps (1e-12) is honoured
        assert W.dino_part(meta_state(manifest), {"layer_norm_eps": 1e-12}, manifest).cfg.layer_norm_eps == 1e-12


def _same_tensor(a, b):
    return a is b or (a._base is not None and a._base is b._base) or a._base is b or b._base is a


def test_compvis_rules_agree_with_diffusers_converter_at_sd15_size():
    """diffusers' converter, run on the real SD v1.5 names (meta tensors), puts every tensor object where our
    rules put it: a swapped pair of same-shape tensors would show here."""
    conv = pytest.importorskip("diffusers.loaders.single_file_utils")
    state = meta_state("sd15_single_file.json", extra=True)
    parts = W.sd_single_file_parts(state, "sd15")
    refs = {"unet": conv.convert_ldm_unet_checkpoint(state, SD15_UNET_JSON),
            "vae": conv.convert_ldm_vae_checkpoint(state, SD15_VAE_JSON),
            "text_encoder": conv.convert_ldm_clip_checkpoint(state)}
    del refs["text_encoder"]["text_model.embeddings.position_ids"]
    for name, ref in refs.items():
        ours = parts[name].state
        assert set(ours) == set(ref), (name, sorted(set(ours) ^ set(ref))[:5])
        wrong = [k for k in ours if not _same_tensor(ours[k], ref[k]) or ours[k].shape != ref[k].shape]
        assert not wrong, (name, wrong[:5])


# ---------------------------------------------------------------------------------------------------------
# Values: tiny checkpoints through files, against diffusers / transformers


@torch.no_grad()
def assert_sd_matches(sd, unet, vae, text_encoder):
    """Our loaded networks against reference ones, in float64: text states, noise prediction, VAE posterior
    and decode."""
    g = torch.Generator().manual_seed(0)
    sd.unet.double(), sd.vae.double(), sd.text_encoder.double()
    ids = sd.tokenizer(["a photo of sks dog on the beach", "a red cube"])
    ctx = text_encoder(input_ids=ids).last_hidden_state
    errs = {"text": max_rel_err(sd.text_encoder(ids), ctx)}
    x, t = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([10, 900])
    errs["unet"] = max_rel_err(sd.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
    img = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    mean, logvar = sd.vae.encode(img)
    posterior = vae.encode(img).latent_dist
    errs["vae mean"], errs["vae logvar"] = max_rel_err(mean, posterior.mean), max_rel_err(logvar, posterior.logvar)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    errs["vae decode"] = max_rel_err(sd.vae.decode(z), vae.decode(z).sample)
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def reference_sd(folder: Path, variant=None):
    """diffusers' U-Net and VAE, transformers' text encoder (sdpa: its eager softmax is float32), in float64."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    kw = {"variant": variant} if variant else {}
    return (diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", **kw).double().eval(),
            diffusers.AutoencoderKL.from_pretrained(folder / "vae", **kw).double().eval(),
            transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", attn_implementation="sdpa",
                                                       **kw).double().eval())


def test_compvis_generator_is_the_real_layout():
    """tests/compvis.py, which writes the tiny single file without tinyrpo, gives exactly the tensor names and
    shapes of the real v1-5-pruned-emaonly file at SD v1.5's sizes."""
    want = json.loads((MANIFESTS / "sd15_single_file.json").read_text())["tensors"]
    assert {k: list(v) for k, v in single_file_shapes(LDMConfig()).items()} == want


def test_single_file_matches_diffusers_converter(tmp_path):
    """The tiny CompVis file (generated in the original code's names by tests/compvis.py, not by tinyrpo's tables)
    loaded by load_sd == the diffusers folder diffusers' own single-file converter makes of it."""
    sd = load_sd(make_tiny_sd(tmp_path / "single", layout="single"))
    assert (sd.unet.cfg, sd.vae.cfg, sd.text_encoder.config) == (TINY_UNET, TINY_VAE, TINY_TEXT)  # all inferred
    assert_sd_matches(sd, *reference_sd(make_tiny_sd(tmp_path / "converted")))


@pytest.mark.parametrize("fp16, legacy", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "fp16-variant", "legacy-vae-attention"])
def test_diffusers_folder_matches_from_pretrained(tmp_path, fp16, legacy):
    folder = make_tiny_sd(tmp_path / "sd", fp16=fp16, legacy_vae_attention=legacy)
    sd = load_sd(folder)  # fp32 by default, whatever the storage
    assert sd.unet.conv_in.weight.dtype == torch.float32
    assert (sd.unet.cfg, sd.vae.cfg) == (TINY_UNET, TINY_VAE)
    assert sd.scheduler_config == SchedulerConfig()
    if legacy:  # diffusers' from_pretrained reads legacy names too, but check against the current-name folder
        folder = make_tiny_sd(tmp_path / "plain")
    assert_sd_matches(sd, *reference_sd(folder, "fp16" if fp16 else None))


def test_fixture_runs_in_diffusers_pipeline(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = make_tiny_sd(tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    sd = load_sd(folder)
    assert sd.tokenizer("a photo of a dog").tolist() == pipe.tokenizer(
        "a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids.tolist()


def test_layouts_dtypes_and_fingerprint(tmp_path):
    """Single file and folder of the same weights load the same tensors and fingerprint; fp16 / bf16 storage
    is cast to the dtype asked for; another seed is another fingerprint."""
    folder = load_sd(make_tiny_sd(tmp_path / "folder"))
    single = load_sd(make_tiny_sd(tmp_path / "single", layout="single"))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    fp16 = load_sd(make_tiny_sd(tmp_path / "fp16", layout="single", fp16=True), dtype=torch.bfloat16)
    assert fp16.unet.conv_in.weight.dtype == torch.bfloat16
    path = make_tiny_sd(tmp_path / "bf16", layout="single")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    bf16 = load_sd(path)
    assert bf16.vae.decoder.conv_out.weight.dtype == torch.float32
    assert folder.fingerprint == single.fingerprint == fp16.fingerprint and len(folder.fingerprint) == 16
    assert load_sd(make_tiny_sd(tmp_path / "other", layout="single", seed=1)).fingerprint != folder.fingerprint
    assert single.source == str(tmp_path / "single" / "tiny-sd-v1.safetensors")


@torch.no_grad()
def test_text_encoder_saved_by_transformers(tmp_path):
    """transformers 5.x writes a CLIPTextModel without the `text_model.` prefix; such a folder loads too."""
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_sd(tmp_path / "sd")
    config = transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder", attn_implementation="sdpa")
    ref = transformers.CLIPTextModel(config).eval()
    state = load_file(folder / "text_encoder" / "model.safetensors")
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()})  # its in-memory names
    shutil.rmtree(folder / "text_encoder")
    ref.save_pretrained(folder / "text_encoder")  # (one loaded by from_pretrained would keep the file's names)
    assert not any(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))
    sd = load_sd(folder, dtype=torch.float64)
    ids = sd.tokenizer(["a photo of sks dog"])
    assert max_rel_err(sd.text_encoder(ids), ref.double()(input_ids=ids).last_hidden_state) <= TOL


@torch.no_grad()
def test_load_clip_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_clip(tmp_path / "clip", projection_dim=24)
    def reference(folder):  # float64; sdpa, as transformers' eager softmax is float32
        return transformers.CLIPModel.from_pretrained(folder, attn_implementation="sdpa").double().eval()

    ours, ref = load_clip(folder, dtype=torch.float64), reference(folder)
    assert ours.config.text.num_heads == 2  # from config.json: shapes alone would say 64 / 64 = 1
    ids = load_sd(make_tiny_sd(tmp_path / "sd")).tokenizer(["a photo of a dog", "a cat"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ref(input_ids=ids, pixel_values=pixels)
    assert max_rel_err(ours.encode_text(ids), out.text_embeds) <= TOL
    assert max_rel_err(ours.encode_image(pixels), out.image_embeds) <= TOL
    assert max_rel_err(ours(ids, pixels), out.logits_per_image) <= TOL
    assert load_clip(folder / "model.safetensors").config == ours.config  # the file itself, config.json beside it
    # and a file written by transformers itself
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16), projection_dim=16)
    randomize_(transformers.CLIPModel(cfg), seed=5).save_pretrained(tmp_path / "hf")
    ours, ref = load_clip(tmp_path / "hf", dtype=torch.float64), reference(tmp_path / "hf")
    out = ref(input_ids=ids, pixel_values=pixels)
    assert max_rel_err(ours(ids, pixels), out.logits_per_image) <= TOL
    assert max_rel_err(ours.encode_image(pixels), out.image_embeds) <= TOL

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.safetensors", bare)
    assert load_clip(bare).config.text.num_heads == 1  # no config.json: heads = width / 64


@torch.no_grad()
def test_load_dino_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    c = TINY_DINO
    def vit(eps):  # transformers' ViTModel in float64 (sdpa: its eager softmax is float32), the same weights
        cfg = transformers.ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                     num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                     image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=eps,
                                     attn_implementation="sdpa")
        return randomize_(transformers.ViTModel(cfg), seed=3).double().eval()  # with its pooler (ignored)

    vit(1e-12).save_pretrained(tmp_path / "hf")  # as facebook/dino-vits16: eps 1e-12 in config.json
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = {eps: vit(eps)(pixel_values=pixels).last_hidden_state[:, 0] for eps in (1e-12, 1e-6)}
    hf = load_dino(tmp_path / "hf", dtype=torch.float64)
    assert hf.config.layer_norm_eps == 1e-12 and hf.config.num_heads == 2
    assert max_rel_err(hf(pixels), want[1e-12]) <= TOL

    # The same weights in DINO's own names (fused qkv), as a .pth: DINO's own eps, 1e-6; and in HF names as
    # pytorch_model.bin beside config.json.
    torch.save(dino_to_original(load_file(tmp_path / "hf" / "model.safetensors")), tmp_path / "dino.pth")
    assert max_rel_err(load_dino(tmp_path / "dino.pth", dtype=torch.float64)(pixels), want[1e-6]) <= TOL
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "bin")
    torch.save(load_file(tmp_path / "hf" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    assert max_rel_err(load_dino(tmp_path / "bin", dtype=torch.float64)(pixels), want[1e-12]) <= TOL

    # the fixture's two layouts hold the same weights (eps aside: HF's 1e-12, DINO's 1e-6)
    a, b = load_dino(make_tiny_dino(tmp_path / "fa", "hf")), load_dino(make_tiny_dino(tmp_path / "fb", "original"))
    assert a.config.layer_norm_eps == 1e-12 and b.config.layer_norm_eps == 1e-6
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# Errors: each one WeightsError that says what is wrong


def expect_error(fn, *fragments):
    with pytest.raises(WeightsError) as e:
        fn()
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    return str(e.value)


def test_missing_paths_name_the_download_command(tmp_path):
    expect_error(lambda: load_sd(tmp_path / "sd15"), "python -m tinyrpo.download sd15")
    expect_error(lambda: load_clip(tmp_path / "clip-vit-base-patch32"), "python -m tinyrpo.download clip-b32")
    expect_error(lambda: load_dino(tmp_path / "dino-vits16"), "python -m tinyrpo.download dino")


def test_folder_without_unet(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")  # not an SD file: not offered as the way out
    msg = expect_error(lambda: load_sd(tmp_path), "no unet/", "--weights takes an SD v1 diffusers folder")
    assert "x.safetensors" not in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_files(tmp_path, damage):
    path = make_tiny_sd(tmp_path, layout="single")
    data = path.read_bytes()
    path.write_bytes(bytes(range(256)) * 64 if damage == "garbage" else data[: len(data) // 2])
    expect_error(lambda: load_sd(path), str(path), "corrupt")
    pth = tmp_path / "dino.pth"
    pth.write_bytes(b"not a pickle")
    expect_error(lambda: load_dino(pth), "corrupt")


def edit_single_file(tmp_path, edit) -> Path:
    path = make_tiny_sd(tmp_path, layout="single")
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return path


def _sd2(s):
    for k in [k for k in s if k.startswith(W.TEXT_PREFIX)]:
        s["cond_stage_model.model." + k[len(W.TEXT_PREFIX):]] = s.pop(k)


def _inpainting(s):
    w = s["model.diffusion_model.input_blocks.0.0.weight"]
    s["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)  # 9 channels


def _unet_only(s):
    for k in [k for k in s if not k.startswith(W.UNET_PREFIX)]:
        del s[k]


@pytest.mark.parametrize("edit, fragments", [
    (_sd2, ["Stable Diffusion 2.x", "cond_stage_model.model"]),
    (lambda s: s.update({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(8)}),
     ["Stable Diffusion XL"]),
    (lambda s: s.update({"model.diffusion_model.label_emb.0.0.weight": torch.ones(8, 8)}), ["Stable Diffusion XL"]),
    (_inpainting, ["inpainting", "9 input channels"]),
    (_unet_only, ["no VAE", "first_stage_model"]),
], ids=["sd2", "sdxl-conditioner", "sdxl-label-emb", "inpainting", "unet-only"])
def test_other_models_refused_by_name(tmp_path, edit, fragments):
    expect_error(lambda: load_sd(edit_single_file(tmp_path, edit)), *fragments)


def test_sd2_u_net_with_linear_projections_refused(tmp_path):
    def linear_proj_in(s):
        for k in [k for k in s if k.endswith(("proj_in.weight", "proj_out.weight")) and "diffusion_model" in k]:
            s[k] = s[k][:, :, 0, 0].contiguous()
    expect_error(lambda: load_sd(edit_single_file(tmp_path, linear_proj_in)), "Stable Diffusion 2.x", "linear")


@pytest.mark.parametrize("config_edit, fragment", [
    ({"cross_attention_dim": 1024}, "SD 2.x"),
    ({"use_linear_projection": True, "attention_head_dim": [5, 10]}, "SD 2.x"),
    ({"addition_embed_type": "text_time"}, "SDXL"),
], ids=["sd2-context-1024", "sd2-linear-projection", "sdxl"])
def test_other_model_folders_refused(tmp_path, config_edit, fragment):
    folder = make_tiny_sd(tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **config_edit}))
    expect_error(lambda: load_sd(folder), fragment, "config.json")


def test_sdxl_folder_refused(tmp_path):
    folder = make_tiny_sd(tmp_path)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    expect_error(lambda: load_sd(folder), "Stable Diffusion XL")


U = "model.diffusion_model."


@pytest.mark.parametrize("edit, fragments", [
    (lambda s: s.pop(U + "out.2.weight"), ["missing " + U + "out.2.weight", "SD v1.x checkpoint?"]),
    (lambda s: s.pop("first_stage_model.decoder.up.0.block.1.conv1.bias"),  # named through the inverted table
     ["missing first_stage_model.decoder.up.0.block.1.conv1.bias"]),
    (lambda s: s.pop(U + "output_blocks.2.1.conv.weight"), ["missing " + U + "output_blocks.2.1.conv.weight"]),
    (lambda s: s.update({U + "input_blocks.1.0.emb_layers.1.weight": torch.zeros(32, 7)}),
     ["mis-shaped " + U + "input_blocks.1.0.emb_layers.1.weight [32, 7] (expected [32, 128])"]),
    (lambda s: s.update({U + "foo.weight": torch.zeros(3)}), ["unexpected " + U + "foo.weight"]),
    (lambda s: s.update({"something_else": torch.zeros(3)}), ["unexpected something_else"]),
], ids=["missing", "missing-vae", "missing-upsampler", "mis-shaped", "unexpected", "unexpected-top-level"])
def test_bad_tensors_are_named(tmp_path, edit, fragments):
    path = edit_single_file(tmp_path, edit)
    msg = expect_error(lambda: load_sd(path), *fragments)
    assert msg.startswith(f"{path} does not match the SD v1 ")


def test_ignorable_tensors_are_ignored(tmp_path):
    """Schedule buffers and position_ids (in every fixture single file) and EMA copies load without complaint."""
    def add_ema(s):
        unet = [k for k in s if k.startswith(U)]
        s.update({"model_ema." + k[len("model."):].replace(".", ""): s[k].clone() for k in unet})
        s["model_ema.decay"], s["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    load_sd(edit_single_file(tmp_path, add_ema))


def test_bad_tensor_in_a_folder_is_named(tmp_path):
    folder = make_tiny_sd(tmp_path)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    del state["decoder.conv_out.bias"]
    save_file(state, vae_file)
    expect_error(lambda: load_sd(folder), f"{vae_file} does not match the SD v1 VAE: missing decoder.conv_out.bias")


def test_wrong_model_for_clip_and_dino(tmp_path):
    dino = make_tiny_dino(tmp_path / "dino")
    expect_error(lambda: load_clip(dino), "is a ViT folder (DINO layout), not a CLIP model", "--dino")
    clip = make_tiny_clip(tmp_path / "clip")
    expect_error(lambda: load_dino(clip), "is a CLIP model folder, not a DINO ViT", "--eval-clip")
    (tmp_path / "other").mkdir()  # a model of none of the kinds: which tensors are missing
    torch.save({"w": torch.ones(2)}, tmp_path / "other" / "pytorch_model.bin")
    expect_error(lambda: load_clip(tmp_path / "other"), "does not match CLIP")
    expect_error(lambda: load_dino(tmp_path / "other" / "pytorch_model.bin"), "does not match DINO")


# ---------------------------------------------------------------------------------------------------------
# The base U-Net's fingerprint (what a checkpoint records of its base)


def test_fingerprint_ignores_dtype_and_sample_size_but_not_weights_or_heads(tmp_path):
    """unet_fingerprint, called directly: the same weights in fp32, fp16, fp64 (and bf16 for weights bf16 can hold)
    name the same base; one weight one fp16 step away, or another head count, another base; sample_size, which a
    single file cannot tell, no part of it."""
    from tinyrpo.formats.checkpoint import FINGERPRINT_TENSORS, unet_fingerprint
    sd = load_sd(make_tiny_sd(tmp_path / "sd"))
    cfg, state = sd.unet.cfg, {k: v.detach() for k, v in sd.unet.state_dict().items()}
    fp = unet_fingerprint(cfg, state)
    for dtype in (torch.float16, torch.float64):
        assert unet_fingerprint(cfg, {k: v.to(dtype) for k, v in state.items()}) == fp, dtype
    bf = {k: v.to(torch.bfloat16).float() for k, v in state.items()}  # values bf16 holds exactly
    assert unet_fingerprint(cfg, {k: v.to(torch.bfloat16) for k, v in bf.items()}) == unet_fingerprint(cfg, bf)
    assert unet_fingerprint(cfg, {k: v.clone() for k, v in state.items()}) == fp  # a copy: no identity in it
    for name in FINGERPRINT_TENSORS:
        moved = {**state, name: state[name].half().float()}
        last = moved[name].view(-1)[-1:]  # the last weight, one fp16 step up: survives the fp16 rounding
        last.copy_(torch.nextafter(last.half(), last.half() + 1).float())
        assert unet_fingerprint(cfg, moved) != fp, name
    assert unet_fingerprint(replace(cfg, num_heads=4), state) != fp
    assert unet_fingerprint(replace(cfg, sample_size=16), state) == fp


def test_checkpoint_of_a_folder_applies_to_the_same_weights_as_a_single_file(tmp_path):
    """A checkpoint trained on a diffusers folder whose sample_size (16) is not SD v1.5's applies to a public single
    file of the same weights, which reads as sample_size 64: the U-Net is the checkpoint's."""
    from tinyrpo.formats.checkpoint import apply_checkpoint, save_checkpoint
    folder = make_tiny_sd(tmp_path / "sd")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": 16}))
    base = load_sd(folder)
    tuned = {k: v + 0.01 for k, v in base.unet.state_dict().items()}
    save_checkpoint(tmp_path / "best.safetensors", tuned, {"base": str(folder), "base_fingerprint": base.fingerprint})
    single = load_sd(make_tiny_sd(tmp_path / "single", layout="single"))
    assert (base.unet.cfg.sample_size, single.unet.cfg.sample_size) == (16, 64)
    apply_checkpoint(single, tmp_path / "best.safetensors")
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in tuned.items())
