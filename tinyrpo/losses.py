"""Denoising losses shared by every method (RPO, DreamBooth, the look-forward DPG method).

These are the readable reference implementations; `tinyrpo/kernels.py` fuses the same arithmetic into
Triton kernels for the GPU and is tested against them. All reductions run in float32, whatever the
dtype of the predictions (bf16 squared errors summed over 16k elements lose digits otherwise).
"""
import torch


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e(x) = mean over C, H, W of (target - pred)^2, one value per sample: [N, ...] -> [N]."""
    # At least float32 (bf16/fp16 are upcast; float64 stays float64, so gradcheck can run on this).
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    return diff.pow(2).flatten(1).mean(dim=1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * e_i: the denoising loss with a weight per sample.

    Weights of 1 give the plain DDPM loss (Ho et al. 2020, eq. 14, "L_simple"); DreamBooth's
    prior-preservation term and per-timestep weightings use other values.
    """
    return (weights.float() * per_sample_mse(pred, target)).mean()
