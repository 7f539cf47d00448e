"""tinyrpo.dino against transformers' ViTModel reading the same facebook/dino-vits16-layout file."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.util import max_rel_err, scaled_init_
from tinyrpo.dino import IMAGENET_MEAN, IMAGENET_STD, DINOConfig, dino_preprocess
from tinyrpo.formats.weights import load_dino

TINY = DINOConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, patch_size=8, image_size=32)
# float64, scaled_init_ weights: max error relative to the output's scale measured on this CPU 5e-16 (both
# layers' eps). A planted bug (measured): the final LayerNorm's eps 1e-6 for 1e-12 moves the output by 6e-8, 1e-5
# for 1e-6 by 5e-7; quick-GELU for GELU, the attention scale or a residual by far more.
TOL64 = 1e-12


@pytest.mark.parametrize("eps", [1e-12, 1e-6], ids=["hf-eps", "dino-eps"])
def test_dino_matches_transformers_vit(tmp_path, eps):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=TINY.hidden_size, num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
        intermediate_size=TINY.intermediate_size, patch_size=TINY.patch_size, image_size=TINY.image_size,
        layer_norm_eps=eps, hidden_act="gelu", attn_implementation="sdpa",  # (eager: a float32 softmax)
    )
    hf = scaled_init_(ViTModel(config, add_pooling_layer=False)).eval()
    hf.save_pretrained(tmp_path)  # the public facebook/dino-vits16 layout

    ours = load_dino(tmp_path).eval().double()  # through the loader's HF-name rules, eps from config.json
    assert ours.config.hidden_size == TINY.hidden_size and ours.config.num_heads == TINY.num_heads
    assert ours.config.layer_norm_eps == eps

    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        ref = hf.double()(pixel_values=pixels).last_hidden_state[:, 0]
        out = ours(pixels)
    assert out.shape == (3, TINY.hidden_size)
    err = max_rel_err(out, ref)
    print(f"eps {eps}: max_rel_err {err:.1e}")
    assert err <= TOL64


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
