"""The toy models: tinyrpo's own networks at toy sizes, written in the public layouts the loaders read.

    SD    a diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
    CLIP  an HF CLIPModel folder: config.json, model.safetensors
    DINO  an HF ViTModel folder (facebook/dino-vits16's names): config.json, model.safetensors

As in SD v1, the SD text encoder is the CLIP's text tower, stored twice. The vocabulary is the real CLIP
BPE (49408 tokens), so its embedding dominates the files: 64 wide, 6.3 MB per fp16 copy. The weights are
stored in fp16 (the loaders cast to the dtype asked for) except the VAE's, kept in fp32 (small, and the
decoder is what every image passes through).
"""
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinyrpo.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from tinyrpo.dino import DINO, DINOConfig
from tinyrpo.formats.layouts import (DINO_HF, MODEL_INDEX_JSON, Renames, clip_config_json, dino_config_json, expand,
                                     scheduler_config_json, text_config_json, unet_config_json, vae_config_json)
from tinyrpo.schedulers import SchedulerConfig
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.unet import UNet, UNetConfig
from tinyrpo.vae import AutoencoderKL, VAEConfig
from tinyrpo.toy.world import SIZE

TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2)
# The shipped CLIP's image tower is 96 wide: 64 wide, it did not learn to see the subject's pattern layout
# (tinyrpo/toy/towers.py). The text tower was trained with a 64-wide partner (FIRST_CLIP, pretraining stage 2).
VISION = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_layers=4, num_heads=3, image_size=SIZE,
                          patch_size=4)
CLIP = CLIPConfig(text=TEXT, vision=VISION, projection_dim=64)
FIRST_CLIP = CLIPConfig(text=TEXT, vision=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_layers=4,
                                                           num_heads=2, image_size=SIZE, patch_size=4),
                        projection_dim=64)
# 32 px -> 8×8×4 latents. (A 16×16 latent, factor 2, reconstructs better but its U-Net learned far slower in
# the pilots: with the same steps, background right 48 % vs 71 %, and noisy pictures.)
VAE = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=SIZE)
UNET = UNetConfig(block_out_channels=(64, 128), layers_per_block=1, attention_levels=(True, True), num_heads=4,
                  cross_attention_dim=TEXT.hidden_size, norm_num_groups=32, sample_size=SIZE // 4)
DINO_CFG = DINOConfig(hidden_size=96, num_layers=4, num_heads=3, intermediate_size=384, patch_size=4, image_size=SIZE)
SCHEDULER = SchedulerConfig()  # SD v1's schedule


def new_models(seed: int = 0) -> dict:
    """Freshly initialized toy networks (PyTorch's default initializations), seeded."""
    torch.manual_seed(seed)
    return {"vae": AutoencoderKL(VAE), "clip": CLIPModel(FIRST_CLIP), "unet": UNet(UNET), "dino": DINO(DINO_CFG)}


def with_new_image_tower(clip: CLIPModel) -> CLIPModel:
    """A CLIP of the shipped shape (CLIP) with `clip`'s text tower, text projection and temperature and a
    freshly initialized image tower."""
    new = CLIPModel(CLIP)
    new.text_model.load_state_dict(clip.text_model.state_dict())
    new.text_projection.load_state_dict(clip.text_projection.state_dict())
    with torch.no_grad():
        new.logit_scale.copy_(clip.logit_scale)
    return new


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- writing

def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(state: dict, path: Path, dtype=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous().cpu()
             for k, t in state.items()}
    save_file(state, str(path))


def save_sd(folder, unet: UNet, vae: AutoencoderKL, text: CLIPTextModel, dtype=torch.float16,
            vae_dtype=torch.float32) -> Path:
    """A diffusers Stable Diffusion folder, as `StableDiffusionPipeline.save_pretrained` lays it out."""
    folder = Path(folder)
    _save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    _json(folder / "unet" / "config.json", unet_config_json(unet.cfg))
    _save(vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", vae_dtype)
    _json(folder / "vae" / "config.json", vae_config_json(vae.cfg))
    _save(text.state_dict(), folder / "text_encoder" / "model.safetensors", dtype)
    _json(folder / "text_encoder" / "config.json", text_config_json(text.config, dtype))
    CLIPTokenizer.from_bpe_gz().save_vocab(folder / "tokenizer")
    _json(folder / "scheduler" / "scheduler_config.json", scheduler_config_json(SCHEDULER))
    _json(folder / "model_index.json", MODEL_INDEX_JSON)
    return folder


def save_clip(folder, clip: CLIPModel, dtype=torch.float16) -> Path:
    """An HF CLIPModel folder (openai/clip-vit-* layout)."""
    folder = Path(folder)
    _save(clip.state_dict(), folder / "model.safetensors", dtype)
    _json(folder / "config.json", clip_config_json(clip.config, dtype))
    return folder


def save_dino(folder, dino: DINO, dtype=torch.float16) -> Path:
    """An HF ViTModel folder with facebook/dino-vits16's names (tinyrpo.formats.layouts.DINO_HF, run backwards)."""
    folder = Path(folder)
    c = dino.config
    names = Renames(expand(DINO_HF, c.num_layers))
    _save({names.file_name(k): t for k, t in dino.state_dict().items()}, folder / "model.safetensors", dtype)
    _json(folder / "config.json", dino_config_json(c, dtype))
    return folder


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """The SD text encoder that is `clip`'s text tower (the same tensors, shared)."""
    text = CLIPTextModel(replace(clip.config.text))
    text.text_model = clip.text_model
    return text
