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
from tinyrpo.schedulers import SchedulerConfig
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.unet import UNet, UNetConfig
from tinyrpo.vae import AutoencoderKL, VAEConfig
from tinyrpo.weights import DINO_HF, Renames, expand
from tinyrpo.toy.world import SIZE

TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2)
VISION = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=2, image_size=SIZE,
                          patch_size=4)
CLIP = CLIPConfig(text=TEXT, vision=VISION, projection_dim=64)
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
    return {"vae": AutoencoderKL(VAE), "clip": CLIPModel(CLIP), "unet": UNet(UNET), "dino": DINO(DINO_CFG)}


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


def unet_config_json(cfg: UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "attention_head_dim": cfg.num_heads,  # diffusers' name for SD v1's number of heads
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


def text_config_json(cfg: CLIPTextConfig) -> dict:
    return {"model_type": "clip_text_model", "hidden_act": cfg.hidden_act, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "max_position_embeddings": cfg.max_position_embeddings,
            "layer_norm_eps": cfg.layer_norm_eps, "vocab_size": cfg.vocab_size, "bos_token_id": 49406,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": 1}


def scheduler_config_json(cfg: SchedulerConfig) -> dict:
    return {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": cfg.beta_end,
            "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start, "clip_sample": cfg.clip_sample,
            "num_train_timesteps": cfg.num_train_timesteps, "set_alpha_to_one": cfg.set_alpha_to_one,
            "skip_prk_steps": True, "steps_offset": cfg.steps_offset, "trained_betas": None}


MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
               "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
               "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


def save_sd(folder, unet: UNet, vae: AutoencoderKL, text: CLIPTextModel, dtype=torch.float16,
            vae_dtype=torch.float32) -> Path:
    """A diffusers Stable Diffusion folder, as `StableDiffusionPipeline.save_pretrained` lays it out."""
    folder = Path(folder)
    _save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    _json(folder / "unet" / "config.json", unet_config_json(unet.cfg))
    _save(vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", vae_dtype)
    _json(folder / "vae" / "config.json", vae_config_json(vae.cfg))
    _save(text.state_dict(), folder / "text_encoder" / "model.safetensors", dtype)
    _json(folder / "text_encoder" / "config.json", {"architectures": ["CLIPTextModel"], **text_config_json(text.config)})
    CLIPTokenizer.from_bpe_gz().save_vocab(folder / "tokenizer")
    _json(folder / "scheduler" / "scheduler_config.json", scheduler_config_json(SCHEDULER))
    _json(folder / "model_index.json", MODEL_INDEX)
    return folder


def save_clip(folder, clip: CLIPModel, dtype=torch.float16) -> Path:
    """An HF CLIPModel folder (openai/clip-vit-* layout)."""
    folder = Path(folder)
    _save(clip.state_dict(), folder / "model.safetensors", dtype)
    c, v = clip.config, clip.config.vision
    _json(folder / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.projection_dim,
        "logit_scale_init_value": 2.6592, "torch_dtype": str(dtype).removeprefix("torch."),
        "text_config": {**text_config_json(c.text), "projection_dim": c.projection_dim},
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": v.hidden_act, "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_heads,
                          "num_hidden_layers": v.num_layers, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                          "projection_dim": c.projection_dim}})
    return folder


def save_dino(folder, dino: DINO, dtype=torch.float16) -> Path:
    """An HF ViTModel folder with facebook/dino-vits16's names (tinyrpo.weights.DINO_HF, run backwards)."""
    folder = Path(folder)
    c = dino.config
    names = Renames(expand(DINO_HF, c.num_layers))
    _save({names.file_name(k): t for k, t in dino.state_dict().items()}, folder / "model.safetensors", dtype)
    _json(folder / "config.json", {
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act, "image_size": c.image_size, "patch_size": c.patch_size,
        "num_channels": c.num_channels, "qkv_bias": True, "layer_norm_eps": c.layer_norm_eps,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch.")})
    return folder


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """The SD text encoder that is `clip`'s text tower (the same tensors, shared)."""
    text = CLIPTextModel(replace(clip.config.text))
    text.text_model = clip.text_model
    return text
