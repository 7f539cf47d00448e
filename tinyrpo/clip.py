"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

The text tower is Stable Diffusion v1's text encoder (SD conditions on its full last hidden state); the
whole model scores image-text agreement (CLIP-T) and image-image similarity (CLIP-I).

Module names are those of HF transformers' `CLIPModel` / `CLIPTextModel` files, so
`openai/clip-vit-*/model.safetensors` and SD's `text_encoder/model.safetensors` load with a plain strict
`load_state_dict` (drop the `*.position_ids` buffers some files carry: we compute positions instead).
Mirrors transformers/models/clip/modeling_clip.py and openai/CLIP clip/model.py.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI trained CLIP with this sigmoid approximation of GELU, so the weights expect it.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    """Multi-head self-attention with separate biased q/k/v projections (HF CLIPAttention names)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale 1/sqrt(d), as CLIP
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "quick_gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). DINO's ViT block is the same."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_dim: int,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, mlp_dim, act, eps) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal=causal)
        return x


# ---------------------------------------------------------------------------------------------------------
# Configs. Defaults are CLIP ViT-L/14 (openai/clip-vit-large-patch14), whose text tower is SD v1's encoder.
# HF config.json spells num_layers/num_heads as num_hidden_layers/num_attention_heads.


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407  # <|endoftext|>; openai config.json files say 2 (a legacy value), which we ignore


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768


# ---------------------------------------------------------------------------------------------------------
# Text tower


class TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_positions, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = cfg.eos_token_id
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, D)
        self.encoder = Encoder(cfg.num_layers, D, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act, eps)
        self.final_layer_norm = nn.LayerNorm(D, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T<=77] -> (last hidden state [B, T, D] after the final LayerNorm, pooled [B, D])."""
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))
        # Pool at the first end-of-text token. Prompts are padded with that same token, so "first" matters;
        # it is also transformers' argmax(ids) for openai configs, since 49407 is the largest id.
        # A row without end-of-text pools at position 0.
        eos = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return x, x[torch.arange(x.shape[0], device=x.device), eos]


class CLIPTextModel(nn.Module):
    """The text tower alone, in the layout of SD's text_encoder/model.safetensors (keys `text_model.*`)."""

    def __init__(self, cfg: CLIPTextConfig | None = None):
        super().__init__()
        self.config = cfg or CLIPTextConfig()
        self.text_model = TextTransformer(self.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, 77] -> last hidden state [B, 77, D], what Stable Diffusion conditions on."""
        return self.text_model(input_ids)[0]

    def pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (last hidden state [B, T, D], pooled end-of-text state [B, D])."""
        return self.text_model(input_ids)


# ---------------------------------------------------------------------------------------------------------
# Vision tower


class VisionEmbeddings(nn.Module):
    def __init__(self, num_channels: int, dim: int, image_size: int, patch_size: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = rearrange(x, "b d gh gw -> b (gh gw) d")  # one token per patch, row by row
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = VisionEmbeddings(cfg.num_channels, D, cfg.image_size, cfg.patch_size)
        self.pre_layrnorm = nn.LayerNorm(D, eps=eps)  # (sic): the checkpoint's spelling
        self.encoder = Encoder(cfg.num_layers, D, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act, eps)
        self.post_layernorm = nn.LayerNorm(D, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (see clip_preprocess) -> pooled class token [B, D]."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


# ---------------------------------------------------------------------------------------------------------
# The two towers with their projections into the shared embedding space


class CLIPModel(nn.Module):
    def __init__(self, cfg: CLIPConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or CLIPConfig()
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> L2-normalized text embeddings [B, P]."""
        return F.normalize(self.text_projection(self.text_model(input_ids)[1]), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (see clip_preprocess) -> L2-normalized image embeddings [B, P]."""
        return F.normalize(self.visual_projection(self.vision_model(pixel_values)), dim=-1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """-> logits_per_image [B_img, B_text] = exp(logit_scale) * cosine similarity."""
        return self.logit_scale.exp() * self.encode_image(pixel_values) @ self.encode_text(input_ids).T


CLIP_VIT_L14 = CLIPConfig()  # openai/clip-vit-large-patch14 (text tower = SD v1 text encoder)
CLIP_VIT_B32 = CLIPConfig(  # openai/clip-vit-base-patch32
    text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8),
    vision=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=32),
    projection_dim=512,
)
CLIP_VIT_B16 = CLIPConfig(  # openai/clip-vit-base-patch16
    text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8),
    vision=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16),
    projection_dim=512,
)
# (These are shared instances: use dataclasses.replace / copy.deepcopy before changing one.)


# ---------------------------------------------------------------------------------------------------------
# Image preprocessing (no torchvision)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resize: int, crop: int, round_offset: bool = False) -> np.ndarray:
    """Resize the shortest side to `resize` (PIL bicubic), center-crop crop x crop -> uint8 [crop, crop, 3].

    The long side is floor(resize * long / short), as in both transformers and torchvision. The crop offset
    is floor((H - crop) / 2) in transformers' CLIPImageProcessor and round() in torchvision's CenterCrop
    (`round_offset=True`); they differ by a pixel when H - crop is odd.
    """
    assert resize >= crop, f"cannot crop {crop} pixels out of a {resize}-pixel side"
    image = convert_to_rgb(image)
    w, h = image.size
    if w <= h:
        w, h = resize, int(resize * h / w)
    else:
        w, h = int(resize * w / h), resize
    image = image.resize((w, h), Image.BICUBIC)
    if round_offset:
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    else:
        top, left = (h - crop) // 2, (w - crop) // 2
    return np.asarray(image)[top : top + crop, left : left + crop]


def normalize(pixels: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], (x / 255 - mean) / std in transformers' float order."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def clip_preprocess(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> [B, 3, size, size]; equals transformers' CLIPImageProcessor (PIL backend)."""
    return normalize(np.stack([resize_center_crop(im, size, size) for im in images]), CLIP_MEAN, CLIP_STD)


def clip_preprocess_tensor(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Float images [B, 3, H, W] in [0, 1], any device -> [B, 3, size, size], differentiable.

    An approximation of `clip_preprocess` for use on the GPU during training: torch's antialiased bicubic
    follows PIL's filter, but works in float without PIL's rounding to uint8 (the test bounds the difference).
    Computes in float32 (antialiased bicubic has no bf16 CPU kernel) and returns the input's dtype.
    """
    H, W = x.shape[-2:]
    h, w = (int(size * H / W), size) if W <= H else (size, int(size * W / H))
    y = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    y = y[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return ((y - mean) / std).to(x.dtype)
