"""DINO ViT-S/16 (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

DreamBooth's DINO score is the cosine similarity of these embeddings (the class token after the final
LayerNorm) between generated and reference images. The ViT block is CLIP's pre-norm block with exact GELU,
so it reuses tinyrpo.clip's EncoderLayer. Module names follow HF `facebook/dino-vits16` at the embedding and
final-norm level and CLIP's inside the blocks; tinyrpo/formats/weights.py maps the HF ViT and DINO-original names.
Mirrors facebookresearch/dino vision_transformer.py.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from PIL import Image

from tinyrpo.clip import Encoder, normalize, resize_center_crop


@dataclass
class DINOConfig:
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    # DINO's code uses 1e-6; HF facebook/dino-vits16 config.json says 1e-12 (ViTConfig's default, not a
    # trained value). Either changes the embedding by ~1e-7 relative: the activations' variance dwarfs both.
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"  # exact (erf) GELU


DINO_VITS16 = DINOConfig()  # facebook/dino-vits16, dino_deitsmall16_pretrain.pth


class PatchEmbeddings(nn.Module):
    def __init__(self, num_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.projection = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return rearrange(self.projection(pixel_values), "b d gh gw -> b (gh gw) d")  # one token per patch


class DINOEmbeddings(nn.Module):
    def __init__(self, num_channels: int, dim: int, image_size: int, patch_size: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, dim))
        self.patch_embeddings = PatchEmbeddings(num_channels, dim, patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings


class DINO(nn.Module):
    def __init__(self, cfg: DINOConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DINOConfig()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = DINOEmbeddings(cfg.num_channels, D, cfg.image_size, cfg.patch_size)
        self.encoder = Encoder(cfg.num_layers, D, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act, eps)
        self.layernorm = nn.LayerNorm(D, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 224, 224] (see dino_preprocess) -> DINO embedding [B, D]: the class token
        after the final LayerNorm (what DINO's k-NN evaluation and DreamBooth's DINO score use)."""
        x = self.encoder(self.embeddings(pixel_values))
        return self.layernorm(x[:, 0])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> [B, 3, size, size].

    DINO's own evaluation transform (eval_knn.py / eval_linear.py): Resize(256, bicubic) on the shortest
    side, CenterCrop(224), ImageNet mean/std — the inputs its features were evaluated on. We follow it
    rather than HF's ViTImageProcessor (a squashing 224x224 resize), and round the crop offset as
    torchvision's CenterCrop does.
    """
    resize = size * 256 // 224
    pixels = np.stack([resize_center_crop(im, resize, size, round_offset=True) for im in images])
    return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
