"""tinyrpo.dino against transformers' ViTModel reading the same facebook/dino-vits16-layout file."""
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.util import max_rel_err, randomize_
from tinyrpo.dino import DINO, DINO_VITS16, IMAGENET_MEAN, IMAGENET_STD, DINOConfig, dino_preprocess

MANIFESTS = Path(__file__).parent / "manifests"
TINY = DINOConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, patch_size=8, image_size=32)

# HF ViT (facebook/dino-vits16) name -> tinyrpo.dino name, applied in order ("attention.output.dense"
# before the MLP's "output.dense").
# TODO: replace with tinyrpo.weights.load_dino once the loader lands.
HF_VIT_RULES = [
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.attention\.attention\.query\.", ".self_attn.q_proj."),
    (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
    (r"\.attention\.attention\.value\.", ".self_attn.v_proj."),
    (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".layer_norm1."),
    (r"\.layernorm_after\.", ".layer_norm2."),
]


def hf_vit_to_tinyrpo(name: str) -> str:
    for pattern, repl in HF_VIT_RULES:
        name = re.sub(pattern, repl, name)
    return name


def test_dino_matches_transformers_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=TINY.hidden_size, num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
        intermediate_size=TINY.intermediate_size, patch_size=TINY.patch_size, image_size=TINY.image_size,
        layer_norm_eps=TINY.layer_norm_eps, hidden_act="gelu", attn_implementation="eager",
    )
    hf = randomize_(ViTModel(config, add_pooling_layer=False)).eval()
    hf.save_pretrained(tmp_path)  # the public facebook/dino-vits16 layout

    ours = DINO(TINY).eval()
    ours.load_state_dict({hf_vit_to_tinyrpo(k): v for k, v in load_file(str(tmp_path / "model.safetensors")).items()})

    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state[:, 0]
        out = ours(pixels)
    assert out.shape == (3, TINY.hidden_size)
    assert max_rel_err(out, ref) <= 1e-4


def test_public_layout():
    """DINO ViT-S/16 at real size, on the meta device, has exactly facebook/dino-vits16's tensors."""
    tensors = json.loads((MANIFESTS / "dino_vits16_hf.json").read_text())["tensors"]
    with torch.device("meta"):
        model = DINO(DINO_VITS16)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {hf_vit_to_tinyrpo(k): v for k, v in tensors.items()}


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
