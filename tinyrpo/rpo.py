"""Reward Preference Optimization (Miao et al. 2024, arXiv 2407.12164), equation by equation.

The reward (eq. 5) scores images; Bradley–Terry (eq. 6) turns two rewards into a random preference label;
the loss (eqs. 7–9) is a denoising similarity term on the reference image plus a DPO-style preference term
(as in Diffusion-DPO, Wallace et al. 2023) comparing the policy U-Net with the frozen base U-Net.
Each is a small pure function; the training loop in `tinyrpo/train.py` calls them.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinyrpo.losses import per_sample_mse


# ---------------------------------------------------------------- reward (eq. 5)

def align_i(image_emb: torch.Tensor, ref_embs: torch.Tensor) -> torch.Tensor:
    """ALIGN-I(x): mean over reference images of (cos(img(x), img(ref)) + 1) / 2, in [0, 1].

    image_emb: [N, D], ref_embs: [R, D], both L2-normalized. Returns [N].
    """
    return ((image_emb @ ref_embs.T + 1) / 2).mean(dim=1)


def align_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """ALIGN-T(x, c): (cos(img(x), txt(c)) + 1) / 2, in [0, 1]. Row i of text_emb is image i's prompt."""
    return ((image_emb * text_emb).sum(dim=-1) + 1) / 2


def harmonic_reward(a_i: torch.Tensor, a_t: torch.Tensor, lam: float) -> torch.Tensor:
    """λ-Harmonic reward, eq. (5): h_λ = 1 / (λ / ALIGN-I + (1 − λ) / ALIGN-T).

    A weighted harmonic mean: unlike the arithmetic mean it stays low when either alignment is low,
    so an image that copies the reference but ignores the prompt (or the reverse) scores badly.
    λ = 0 scores text alignment only (the authors' training value), λ = 1 image alignment only.
    """
    return 1.0 / (lam / a_i + (1.0 - lam) / a_t)


# ---------------------------------------------------------------- preference labels (eq. 6)

def preference_probability(h_w: torch.Tensor, h_l: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry, eq. (6): p(w ≻ l) = σ(h(w) − h(l))."""
    return torch.sigmoid(h_w - h_l)


def sample_label(h_w: torch.Tensor, h_l: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y ~ Bernoulli(σ(h(w) − h(l))): 1 means "w is preferred". Re-drawn every time a pair is used."""
    p = preference_probability(h_w, h_l)
    u = torch.rand(p.shape, generator=generator, device=p.device if generator is None else generator.device)
    return (u.to(p.device) < p).to(p.dtype)


# ---------------------------------------------------------------- loss (eqs. 7–9)

def l_sim(e_theta_w: torch.Tensor) -> torch.Tensor:
    """Similarity loss, eq. (7): L_sim = e_θ(w) = mean ‖ε − ε_θ(w_t, t, c)‖², on the reference image only."""
    return e_theta_w


def delta(e_theta_w, e_theta_l, e_ref_w, e_ref_l) -> torch.Tensor:
    """Δ = (e_ref(w) − e_θ(w)) − (e_ref(l) − e_θ(l)), eq. (8).

    Positive when the policy improved on the base model more for w than for l.
    """
    return (e_ref_w - e_theta_w) - (e_ref_l - e_theta_l)


def l_pref(d: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Preference loss, eq. (8): −[y·log σ(βΔ) + (1 − y)·log σ(−βΔ)] (binary cross-entropy on βΔ).

    With y = 1 this is Diffusion-DPO's loss; y = 0 asks for the opposite preference.
    """
    return -(y * F.logsigmoid(beta * d) + (1 - y) * F.logsigmoid(-beta * d))


class RPOLoss(NamedTuple):
    loss: torch.Tensor    # scalar: L = L_sim + L_pref, eq. (9)
    l_sim: torch.Tensor   # scalar, batch mean
    l_pref: torch.Tensor  # scalar, batch mean
    delta: torch.Tensor   # [B], one Δ per pair


def rpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, noise: torch.Tensor,
             y: torch.Tensor, beta: float) -> RPOLoss:
    """The RPO objective for B pairs, eq. (9): L = L_sim + L_pref, averaged over pairs.

    model_pred, ref_pred, noise: [2B, C, H, W], winners (reference images) in the first half, losers
    (generated images) in the second; the two halves of `noise` are the same ε (a pair shares ε and t).
    y: [B] labels. Only `model_pred` needs a gradient.
    """
    e_theta_w, e_theta_l = per_sample_mse(model_pred, noise).chunk(2)
    e_ref_w, e_ref_l = per_sample_mse(ref_pred, noise).chunk(2)
    d = delta(e_theta_w, e_theta_l, e_ref_w, e_ref_l)
    sim = l_sim(e_theta_w).mean()
    pref = l_pref(d, y.float(), beta).mean()
    return RPOLoss(sim + pref, sim, pref, d)
