"""tinyrpo.dino against transformers' ViTModel reading the same facebook/dino-vits16-layout file."""

import numpy as np
import torch
from PIL import Image

from tests.util import max_rel_err, randomize_
from tinyrpo.dino import IMAGENET_MEAN, IMAGENET_STD, DINOConfig, dino_preprocess
from tinyrpo.weights import load_dino

TINY = DINOConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, patch_size=8, image_size=32)


def test_dino_matches_transformers_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=TINY.hidden_size, num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
        intermediate_size=TINY.intermediate_size, patch_size=TINY.patch_size, image_size=TINY.image_size,
        layer_norm_eps=TINY.layer_norm_eps, hidden_act="gelu", attn_implementation="eager",
    )
    hf = randomize_(ViTModel(config, add_pooling_layer=False)).eval()
    hf.save_pretrained(tmp_path)  # the public facebook/dino-vits16 layout

    ours = load_dino(tmp_path).eval()  # through the loader's HF-name rules
    assert ours.config.hidden_size == TINY.hidden_size and ours.config.num_heads == TINY.num_heads

    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state[:, 0]
        out = ours(pixels)
    assert out.shape == (3, TINY.hidden_size)
    assert max_rel_err(out, ref) <= 1e-4


# The real-size layout (HF and DINO-original names) is covered in tests/test_weights.py.


def test_preprocess_is_dinos_eval_transform():
    """Resize(256, bicubic) + CenterCrop(224) + ImageNet normalization, checked against transformers' PIL
    processor set up the same way. Its crop offset is floor((H-224)/2), torchvision's (and ours) round():
    equal for the landscape image, one row apart for the portrait one (951 rows: 363.5 -> 364 vs 363)."""
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        resample=Image.BICUBIC, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    rng = np.random.default_rng(0)
    landscape = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # -> 256 x 384
    portrait = Image.fromarray(rng.integers(0, 256, (457, 123, 3), dtype=np.uint8))  # -> 951 x 256

    ours = dino_preprocess([landscape, portrait])
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    ref = processor(images=[landscape], return_tensors="pt")["pixel_values"][0]
    assert (ours[0] - ref).abs().max().item() <= 1e-5
    ref = processor(images=[portrait], return_tensors="pt")["pixel_values"][0]
    assert (ours[1, :, :-1] - ref[:, 1:]).abs().max().item() <= 1e-5
