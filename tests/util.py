"""Helpers shared by the tests."""
import json
import re

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Re-initialize every parameter so that no zero-initialized layer can hide a bug.

    Norm scales (1-D tensors named `weight`) become 1 + N(0, std), everything else N(0, std).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if p.ndim == 1 and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise.to(p.dtype))
    return module


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (max |b|)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# AUTOMATIC1111's infotext grammar (stable-diffusion-webui modules/infotext_utils.py): the last line is
# "key: value" pairs, a value either a JSON string or text up to the next comma.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """A PNG `parameters` text -> {"Prompt", "Negative prompt", key: value, ...}, read as A1111 reads it."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:  # no parameter line: everything is prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in _A1111_PARAM.findall(last):
        out[k] = json.loads(v) if v[:1] == '"' == v[-1:] else v
    return out


EMBEDDING_TABLES = ("token_embedding", "position_embedding", "class_embedding", "cls_token")


@torch.no_grad()
def scaled_init_(module: torch.nn.Module, seed: int = 0, gain: float = 1.5) -> torch.nn.Module:
    """Weights at the scale of a trained network, so that every op of a forward pass matters.

    With `randomize_`'s std 0.05 the activations shrink layer by layer and attention logits are ~1e-3: the
    softmax is uniform, so a wrong attention scale, a missing residual or a wrong norm eps change the output
    by less than float32 rounding. Here every matrix is N(0, gain^2 / fan_in) (activations keep unit scale,
    attention logits have a std of about gain^2 ~ 2, a peaked softmax), biases N(0, 0.1^2), norm scales
    1 + N(0, 0.2^2) and shifts N(0, 0.2^2), embeddings N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 and leaf == "weight":  # a norm's scale
            value = 1 + 0.2 * noise
        elif p.ndim == 1 and leaf == "bias":
            value = 0.2 * noise if "norm" in name else 0.1 * noise
        elif any(t in name for t in EMBEDDING_TABLES) or p.ndim == 0:  # and CLIP's logit scale
            value = noise
        else:  # linear / conv weights
            value = noise * gain / (p[0].numel() ** 0.5)
        p.copy_(value.to(p.dtype))
    return module
