"""tinyrpo.clip against transformers' CLIP: same weights through HF-layout files, same outputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.util import max_rel_err, scaled_init_
from tinyrpo.clip import (
    CLIP_VIT_B32,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    clip_preprocess,
    clip_preprocess_tensor,
    convert_to_rgb,
)

MANIFESTS = Path(__file__).parent / "manifests"
BOS, EOS = 49406, 49407
# The parity tests run in float64 with scaled_init_ weights; max error relative to the output's scale,
# measured on this CPU: 4e-16 .. 9e-16 (text states, pooled outputs, embeddings, logits). A planted bug stands
# far above TOL64 (measured): LayerNorm eps 1e-6 for 1e-5 in the first norm of each layer moves the outputs by
# 5e-6 .. 1e-5; GELU for quick-GELU, the attention scale, the causal mask or a residual by far more. TOL (float32) is for the other tests.
TOL64, TOL = 1e-12, 1e-5

# Tiny towers of different widths, so a swapped projection cannot pass.
TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
VISION = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, image_size=32, patch_size=8)
TINY = CLIPConfig(text=TEXT, vision=VISION, projection_dim=16)


def hf_text_config(t: CLIPTextConfig, eos_token_id: int) -> dict:
    return dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act, eos_token_id=eos_token_id, bos_token_id=BOS,
    )


def hf_vision_config(v: CLIPVisionConfig) -> dict:
    return dict(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
    )


def save_hf(model: torch.nn.Module, folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_oracle(cls, folder: Path):
    # sdpa: the eager path runs its softmax in float32 even in a float64 model
    model, info = cls.from_pretrained(folder, attn_implementation="sdpa", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval().double()


def prompts() -> torch.Tensor:
    """[3, 77]: two short prompts padded with end-of-text (as SD pads), one filling all 77 positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 77), EOS)
    for row, n in enumerate((5, 30, 75)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(0, BOS, (n,), generator=g)
    return ids


@pytest.mark.parametrize("hf_eos", [2, EOS], ids=["openai-legacy-eos", "eos-49407"])
def test_text_encoder_matches_transformers(tmp_path, hf_eos):
    """SD's text encoder: a text_model.* file, read by transformers' CLIPTextModel."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    ours = scaled_init_(CLIPTextModel(TEXT)).eval()
    config = dict(hf_text_config(TEXT, hf_eos), model_type="clip_text_model", architectures=["CLIPTextModel"])
    hf = load_oracle(HFCLIPTextModel, save_hf(ours, tmp_path / "text_encoder", config))
    ours.double()

    short = torch.tensor([[BOS, 320, 1125, 539, 320, 2368, EOS]])  # a prompt shorter than 77, unpadded
    with torch.no_grad():
        for ids in (prompts(), short):
            ref = hf(input_ids=ids)
            last, pooled = ours.pooled(ids)
            assert torch.equal(ours(ids), last)
            assert last.shape == (ids.shape[0], ids.shape[1], TEXT.hidden_size)
            errs = max_rel_err(last, ref.last_hidden_state), max_rel_err(pooled, ref.pooler_output)
            print(f"text encoder max_rel_err {max(errs):.1e}")
            assert max(errs) <= TOL64, errs


@pytest.mark.parametrize("hf_eos", [2, EOS], ids=["openai-legacy-eos", "eos-49407"])
def test_clip_model_matches_transformers(tmp_path, hf_eos):
    from transformers import CLIPModel as HFCLIPModel

    ours = scaled_init_(CLIPModel(TINY)).eval()
    config = dict(
        model_type="clip", architectures=["CLIPModel"], projection_dim=TINY.projection_dim,
        text_config=hf_text_config(TEXT, hf_eos), vision_config=hf_vision_config(VISION),
    )
    hf = load_oracle(HFCLIPModel, save_hf(ours, tmp_path / "clip", config))
    ours.double()

    ids = prompts()
    pixels = torch.randn(2, 3, VISION.image_size, VISION.image_size, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    with torch.no_grad():
        ref_text, ref_vision = hf.text_model(input_ids=ids), hf.vision_model(pixel_values=pixels)
        last, pooled = ours.text_model(ids)
        ref = hf(input_ids=ids, pixel_values=pixels)  # its text_embeds / image_embeds are L2-normalized
        errs = {"text states": max_rel_err(last, ref_text.last_hidden_state),
                "text pooled": max_rel_err(pooled, ref_text.pooler_output),
                "vision pooled": max_rel_err(ours.vision_model(pixels), ref_vision.pooler_output),
                "text embeds": max_rel_err(ours.encode_text(ids), ref.text_embeds),
                "image embeds": max_rel_err(ours.encode_image(pixels), ref.image_embeds),
                "logits": max_rel_err(ours(ids, pixels), ref.logits_per_image)}
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL64, errs


def test_transformers_file_loads_strictly(tmp_path):
    """The other direction: a file written by transformers' save_pretrained loads with strict=True."""
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel as HFCLIPModel

    hf = HFCLIPModel(HFCLIPConfig(
        text_config=hf_text_config(TEXT, EOS), vision_config=hf_vision_config(VISION), projection_dim=16,
    ))
    hf.save_pretrained(tmp_path)
    ours = CLIPModel(TINY)
    ours.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)


# --- real-size layouts, built on the meta device (no memory, no weights) ---------------------------------


def manifest(name: str) -> dict[str, list[int]]:
    tensors = json.loads((MANIFESTS / name).read_text())["tensors"]
    return {k: v for k, v in tensors.items() if not k.endswith("position_ids")}


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make, file", [
    (lambda: CLIPModel(CLIPConfig()), "clip_vit_l14_hf.json"),
    (lambda: CLIPModel(CLIP_VIT_B32), "clip_vit_b32_hf.json"),
    (lambda: CLIPTextModel(CLIPTextConfig()), "sd15_diffusers_text_encoder.json"),
], ids=["vit-l14", "vit-b32", "sd15-text-encoder"])
def test_public_layouts(make, file):
    with torch.device("meta"):
        model = make()
    assert shapes(model) == manifest(file)


# --- preprocessing ------------------------------------------------------------------------------------------


def synthetic_images() -> list[Image.Image]:
    """Odd sizes and modes: landscape, portrait, tiny (upscaled), square, grayscale, transparent."""
    rng = np.random.default_rng(0)

    def rgb(w, h):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        return np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)

    rgba = np.concatenate([rgb(97, 131), rng.integers(0, 256, (131, 97, 1), dtype=np.uint8)], axis=-1)
    return [
        Image.fromarray(rgb(301, 200)),
        Image.fromarray(rgb(123, 457)),
        Image.fromarray(rgb(17, 9)),
        Image.fromarray(rgb(224, 224)),
        Image.fromarray(rgb(250, 250)).convert("L"),
        Image.fromarray(rgba, "RGBA"),
    ]


@pytest.mark.parametrize("size", [224, 64])
def test_preprocess_matches_transformers(size):
    # transformers falls back to this PIL/numpy backend when torchvision is missing; name it so a machine
    # with torchvision still tests the same path.
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    for image in synthetic_images():
        ref = processor(images=[image], return_tensors="pt")["pixel_values"]
        ours = clip_preprocess([image], size=size)
        assert ours.shape == ref.shape == (1, 3, size, size) and ours.dtype == torch.float32
        assert (ours - ref).abs().max().item() <= 1e-5, image.size


def test_preprocess_tensor_approximates_pil():
    images = synthetic_images()
    batch = clip_preprocess(images)
    for image, ref in zip(images, batch):
        x = torch.from_numpy(np.array(convert_to_rgb(image))).permute(2, 0, 1)[None].float() / 255
        ours = clip_preprocess_tensor(x)[0]
        assert ours.shape == ref.shape
        err = (ours - ref).abs().mean().item()
        print(image.size, image.mode, f"mean abs {err:.2e}")
        assert err < 0.02, image.size

