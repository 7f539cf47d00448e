"""Tiny but complete checkpoints in the public layouts, for the sampling / training / evaluation tests.

    make_tiny_sd(dest, layout="diffusers" | "single", fp16=False, seed=0)  -> folder or .safetensors file
    make_tiny_clip(dest, projection_dim=32, seed=0)                         -> folder (model.safetensors, config.json)
    make_tiny_dino(dest, layout="hf" | "original", seed=0)                  -> folder, or the .pth file

Weights are random (std 0.05), written with safetensors, with the config.json files diffusers /
transformers write, so `from_pretrained` of the reference libraries reads the same files.

No layout is produced by running tinyrpo's own rename tables backwards (a wrong table would then be mirrored
in its fixture and pass): the SD single file is generated directly in the CompVis names by tests/compvis.py,
and the diffusers folder is what diffusers' own single-file converter makes of it; the DINO layouts are
written by transformers (HF) and by a hand-written HF -> DINO name map. The sizes obey the rules a
config-less single file is read by (norm groups 32, 8 U-Net heads, text heads = width / 64), so both SD
layouts hold the same model. The tokenizer is the real CLIP vocabulary (tinyrpo's vendored copy).
"""
import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.compvis import LDMConfig, random_single_file
from tests.util import randomize_
from tinyrpo.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from tinyrpo.dino import DINOConfig
from tinyrpo.schedulers import SchedulerConfig, make_betas
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.unet import UNet, UNetConfig
from tinyrpo.vae import AutoencoderKL, VAEConfig

# Two levels each; the U-Net attends on level 0 only (as SD v1 attends on all levels but the last). The
# sample sizes keep SD v1.5's values (informational here), which is also what a config-less single file reads as.
TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=2, attention_levels=(True, False), num_heads=8,
                       cross_attention_dim=128, norm_num_groups=32, sample_size=64)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=512)  # factor 2
TINY_TEXT = CLIPTextConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2)  # real vocab: 49408
TINY_CLIP_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
TINY_CLIP_VISION = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=32,
                                    patch_size=8)
TINY_DINO = DINOConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, patch_size=8, image_size=32)
# The same tiny SD as the original code's constructor arguments (tests/compvis.py)
TINY_LDM = LDMConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1,),
                     context_dim=128, vae_ch=32, vae_ch_mult=(1, 2), vae_num_res_blocks=1, text_width=128,
                     text_layers=2, text_mlp=256)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(state: dict, path: Path, dtype=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    state = {k: t.contiguous() for k, t in state.items()}
    save_file(state, str(path))


# ---- config.json files as diffusers / transformers write them (SD v1.5's, resized)


def unet_config_json(cfg: UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "attention_head_dim": cfg.num_heads,  # diffusers' name for the number of heads in SD v1
            "block_out_channels": list(cfg.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": cfg.cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": cfg.in_channels,
            "layers_per_block": cfg.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]]}


def vae_config_json(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
            "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
            "out_channels": cfg.out_channels, "sample_size": cfg.sample_size, "scaling_factor": cfg.scaling_factor,
            "up_block_types": ["UpDecoderBlock2D"] * n}


def clip_text_config_json(cfg: CLIPTextConfig, eos_token_id: int = 2) -> dict:
    # SD v1.5's text_encoder/config.json says eos_token_id 2 (a leftover): kept, as the loader must cope.
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": cfg.hidden_act,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "max_position_embeddings": cfg.max_position_embeddings, "layer_norm_eps": cfg.layer_norm_eps,
            "vocab_size": cfg.vocab_size, "bos_token_id": 0 if eos_token_id == 2 else 49406,
            "eos_token_id": eos_token_id, "pad_token_id": 1, "torch_dtype": "float32"}


SCHEDULER_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None}
MODEL_INDEX_JSON = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                    "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
                    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"]}


# ---- Stable Diffusion


@lru_cache(maxsize=4)
def tiny_sd_single_file(seed: int = 0) -> dict:
    """The tiny SD as a CompVis single-file state dict (cached per seed: treat it as read-only)."""
    return {**random_single_file(TINY_LDM, seed=seed), **schedule_buffers()}


@lru_cache(maxsize=4)
def tiny_sd_diffusers(seed: int = 0) -> dict:
    """{"unet" | "vae" | "text_encoder": state dict in diffusers / HF names}: diffusers' own single-file
    converter run on tiny_sd_single_file (cached: read-only)."""
    conv = _single_file_utils()
    state = tiny_sd_single_file(seed)
    out = {"unet": conv.convert_ldm_unet_checkpoint(state, unet_config_json(TINY_UNET)),
           "vae": conv.convert_ldm_vae_checkpoint(state, vae_config_json(TINY_VAE)),
           "text_encoder": conv.convert_ldm_clip_checkpoint(state)}
    return {part: {k: t.contiguous() for k, t in tensors.items() if not k.endswith("position_ids")}
            for part, tensors in out.items()}


def _single_file_utils():
    try:
        from diffusers.loaders import single_file_utils
    except ImportError:  # the test extra; tests that need a tiny SD need diffusers as its converter
        import pytest
        pytest.skip("diffusers (the test extra) converts the tiny SD checkpoint")
    return single_file_utils


@lru_cache(maxsize=4)
def tiny_sd_models(seed: int = 0) -> tuple[UNet, AutoencoderKL, CLIPTextModel]:
    """The tiny networks, loaded from the diffusers-layout tensors (cached per seed: treat them as read-only)."""
    parts = tiny_sd_diffusers(seed)
    models = UNet(TINY_UNET), AutoencoderKL(TINY_VAE), CLIPTextModel(TINY_TEXT)
    for model, part in zip(models, ("unet", "vae", "text_encoder")):
        model.load_state_dict(parts[part])
    return models


@lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_gz()


def schedule_buffers(n: int = 1000) -> dict:
    """The noise-schedule buffers LatentDiffusion saves into every single file (loaders ignore them)."""
    betas = make_betas(SchedulerConfig(num_train_timesteps=n))
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1), a[:-1]])
    var = betas * (1 - a_prev) / (1 - a)
    return {"betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "sqrt_alphas_cumprod": a.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(), "log_one_minus_alphas_cumprod": (1 - a).log(),
            "sqrt_recip_alphas_cumprod": (1 / a).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
            "posterior_variance": var, "posterior_log_variance_clipped": var.clamp_min(1e-20).log(),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
            "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a)}


def make_tiny_sd(dest, layout: str = "diffusers", fp16: bool = False, seed: int = 0,
                 legacy_vae_attention: bool = False) -> Path:
    """A tiny SD v1 at `dest`: a diffusers folder (returned), or for layout="single" the same weights as
    dest/tiny-sd-v1.safetensors in the CompVis layout (returned). fp16: store half-precision weights (the
    folder then holds only diffusers' `.fp16.` variant files). legacy_vae_attention: the VAE's attention
    named query/key/value/proj_attn, as diffusers saved it before 0.14."""
    dest = Path(dest)
    if layout == "single":
        path = dest / "tiny-sd-v1.safetensors"
        _save(tiny_sd_single_file(seed), path, torch.float16 if fp16 else None)
        return path
    assert layout == "diffusers", f"unknown layout {layout!r}"
    parts = tiny_sd_diffusers(seed)
    return _write_sd_folder(dest, parts["unet"], parts["vae"], parts["text_encoder"], TINY_UNET, TINY_VAE, TINY_TEXT,
                            fp16, legacy_vae_attention)


def write_sd_folder(dest, unet: UNet, vae: AutoencoderKL, text: CLIPTextModel, fp16: bool = False,
                    legacy_vae_attention: bool = False) -> Path:
    """Any SD v1 networks as a diffusers folder (see make_tiny_sd; bench/gpu.py writes SD v1.5-size ones)."""
    return _write_sd_folder(dest, unet.state_dict(), vae.state_dict(), text.state_dict(), unet.cfg, vae.cfg,
                            text.config, fp16, legacy_vae_attention)


def _write_sd_folder(dest, unet_state, vae_state, text_state, unet_cfg, vae_cfg, text_cfg, fp16, legacy_vae_attention):
    dest = Path(dest)
    dtype = torch.float16 if fp16 else None
    v = ".fp16" if fp16 else ""
    _save(unet_state, dest / "unet" / f"diffusion_pytorch_model{v}.safetensors", dtype)
    _json(dest / "unet" / "config.json", unet_config_json(unet_cfg))
    vae_state = dict(vae_state)
    if legacy_vae_attention:
        new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for k in list(vae_state):
            for a, b in new.items():
                if f"attentions.0.{a}." in k:
                    vae_state[k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")] = vae_state.pop(k)
    _save(vae_state, dest / "vae" / f"diffusion_pytorch_model{v}.safetensors", dtype)
    _json(dest / "vae" / "config.json", vae_config_json(vae_cfg))
    _save(text_state, dest / "text_encoder" / f"model{v}.safetensors", dtype)
    _json(dest / "text_encoder" / "config.json", clip_text_config_json(text_cfg))
    _tokenizer().save_vocab(dest / "tokenizer")
    _json(dest / "scheduler" / "scheduler_config.json", SCHEDULER_JSON)
    _json(dest / "model_index.json", MODEL_INDEX_JSON)
    return dest


# ---- CLIP and DINO


def make_tiny_clip(dest, projection_dim: int = 32, seed: int = 0) -> Path:
    """A tiny CLIPModel (real vocabulary, 32-pixel images in 8-pixel patches) as an HF folder."""
    cfg = CLIPConfig(text=TINY_CLIP_TEXT, vision=TINY_CLIP_VISION, projection_dim=projection_dim)
    return write_clip_folder(dest, randomize_(CLIPModel(cfg), seed=seed))


def write_clip_folder(dest, model: CLIPModel, fp16: bool = False) -> Path:
    """Any CLIPModel as an HF folder (model.safetensors, config.json), as transformers saves one."""
    dest = Path(dest)
    cfg = model.config
    _save(model.state_dict(), dest / "model.safetensors", torch.float16 if fp16 else None)
    t, v, projection_dim = cfg.text, cfg.vision, cfg.projection_dim
    text_config = clip_text_config_json(t, eos_token_id=49407)
    del text_config["architectures"], text_config["torch_dtype"]
    _json(dest / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection_dim,
        "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
        "text_config": {**text_config, "projection_dim": projection_dim},
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": v.hidden_act, "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_heads,
                          "num_hidden_layers": v.num_layers, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                          "projection_dim": projection_dim}})
    return dest


# HF ViTModel names -> DINO's own (facebookresearch/dino vision_transformer.py), written out by hand rather than
# taken from tinyrpo's table: per layer, (HF, DINO) module paths; q/k/v are fused into attn.qkv below.
_DINO_NAMES = [("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
               ("embeddings.patch_embeddings.projection", "patch_embed.proj"), ("layernorm", "norm")]
_DINO_LAYER = [("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"), ("layernorm_after", "norm2"),
               ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]


def dino_to_original(hf_state: dict) -> dict:
    """A DINO ViT in HF ViTModel names (as transformers saves it) -> DINO's own names, q/k/v fused back into
    attn.qkv ([q; k; v] by output rows, as vision_transformer.py's Attention reads it)."""
    state = {k.removeprefix("vit."): t for k, t in hf_state.items() if not k.startswith(("pooler.", "vit.pooler."))}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    out = {}
    for k, t in state.items():
        for hf, ours in _DINO_NAMES:
            if k.startswith(hf + ".") or k == hf:
                out[ours + k[len(hf):]] = t
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for hf, ours in _DINO_LAYER:
            for w in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{w}"] = state[f"{p}.{hf}.{w}"]
        for w in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([state[f"{p}.attention.attention.{x}.{w}"]
                                                        for x in ("query", "key", "value")])
    assert len(out) == len(state) - 2 * 3 * layers + 2 * layers, "a tensor left unmapped"
    return out


def _hf_vit(cfg: DINOConfig, eps: float, seed: int):
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                       hidden_act=cfg.hidden_act, image_size=cfg.image_size, patch_size=cfg.patch_size,
                       num_channels=cfg.num_channels, qkv_bias=True, layer_norm_eps=eps)
    return randomize_(ViTModel(config, add_pooling_layer=False), seed=seed).eval()


def make_tiny_dino(dest, layout: str = "hf", seed: int = 0) -> Path:
    """A tiny DINO ViT: layout "hf" = an HF ViTModel folder written by transformers (model.safetensors,
    config.json with facebook/dino-vits16's eps 1e-12), returned; "original" = the same weights in DINO's own
    names in dest/dino_tiny.pth (torch.save), returned (DINO itself uses eps 1e-6)."""
    dest = Path(dest)
    assert layout in ("hf", "original"), f"unknown layout {layout!r}"
    hf = dest if layout == "hf" else dest / "hf"
    _hf_vit(TINY_DINO, 1e-12, seed).save_pretrained(hf)  # (transformers renames its modules on saving)
    if layout == "hf":
        return dest
    torch.save(dino_to_original(load_file(hf / "model.safetensors")), dest / "dino_tiny.pth")
    shutil.rmtree(hf)
    return dest / "dino_tiny.pth"
