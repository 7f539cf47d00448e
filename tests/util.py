"""Helpers shared by the tests."""
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
