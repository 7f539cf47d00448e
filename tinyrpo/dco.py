"""Direct Consistency Optimization (Lee et al. 2024, arXiv 2402.12004; the authors' code: kyungmnlee/dco).

Fine-tuning as KL-regularized reward maximization with the subject's photos as the only data: the policy is asked
to denoise a photo better than the frozen base model does, and the logistic link stops asking once it does so
by a margin of about 1/β, which keeps it close to the base model (the "consistency" of the name):

    L_DCO = −E[ log σ(−β · (‖ε_θ(x_t, c, t) − ε‖² − ‖ε_ref(x_t, c, t) − ε‖²)) ]              (DCO loss)

ε_ref is the base model's prediction on the same x_t, t and text c (same ε target). Unlike Diffusion-DPO there is
no loser image and no label: one photo per row. With policy = reference the loss is log 2 and its gradient is
β/2 times the plain denoising loss's; it falls towards 0 once the policy beats the base model on the photos.

Every value below is from the authors' code, customize.py (commit 164ae17), as the paper's body could not be read
here (only its abstract: arxiv.org/abs/2402.12004), so the equation is cited by its code:
- ‖·‖² is F.mse_loss with reduction "mean": the mean over the latent's elements (losses.per_sample_mse), so
  β = --dco-beta 1000 (`--dcoloss_beta` default; "1000-2000 works fine", their README) is on that scale;
- the reference is the same U-Net with its LoRA scale at 0 (cross_attention_kwargs scale 0.0): the base model on
  the same noisy latent, timestep and prompt embeddings (their frozen-text-encoder branch) and the same ε target;
- their runs are LoRA (rank 32, α = rank, lr 5e-5 constant, AdamW, gradient norm clipped to 1, batch 1); the
  subject recipe in their README runs 2000 steps; no prior-preservation data (`--with_prior_preservation` is off
  by default, and the paper offers DCO instead of it); the checkpoint is the last step.

Where tinyrpo departs, and why:
- prompts: every photo is denoised with the subject's reference prompt ("a photo of sks dog"), as DreamBooth's
  instance term. The authors recommend a hand-written comprehensive caption per photo, no rare token, and learned
  token embeddings (`--train_text_encoder_ti`, whose reference then sees the caption without the new token);
  tinyrpo has no captions for a subject's photos and no textual inversion, so it takes their frozen-text-encoder
  branch, where policy and reference see the same prompt;
- the loss is the mean over rows of the per-row loss (the paper's expectation outside the log σ); their code puts
  the batch mean of each error inside it. At their batch size 1 the two are the same;
- x_0 is the VAE posterior mean, computed once (they sample the posterior every step), as for every method here;
- full fine-tuning (no --lora) has no value from the authors: lr 5e-6, tinyrpo's DreamBooth value, since the
  paper measures DCO against DreamBooth run with the same settings (their code's DreamBooth is the same script
  with the DCO loss off);
- the shared loop's AdamW uses weight decay 1e-2 (theirs 1e-4) and no offset noise (their subject default 0);
- their reward-guided sampling (reward_guidance.py: classifier-free guidance plus rg_scale times the difference
  of the predictions with and without the subject's token in the prompt, rg_scale 3 in their README) is a
  sampler, not training: not built here; sample.py draws with plain classifier-free guidance.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinyrpo.losses import per_sample_mse
from tinyrpo.method import Method, MethodOptions, StepOutput, encode_images


# ---------------------------------------------------------------- the loss

def dco_loss(e_theta: torch.Tensor, e_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """The DCO loss of each row: −log σ(−β (e_θ − e_ref)), e_* = per-row denoising errors ‖ε_* − ε‖² [B] -> [B].

    Lower when the policy denoises the photo better than the base model (e_θ < e_ref); log 2 when they are equal.
    """
    return -F.logsigmoid(-beta * (e_theta - e_ref))


class DCOLoss(NamedTuple):
    loss: torch.Tensor     # scalar: the mean over rows of dco_loss
    e_theta: torch.Tensor  # [B] the policy's error on each photo (no gradient: for the log)
    e_ref: torch.Tensor    # [B] the base model's error on the same inputs


def dco_objective(model_pred: torch.Tensor, ref_pred: torch.Tensor, noise: torch.Tensor, beta: float) -> DCOLoss:
    """The DCO loss for B rows, from the policy's and the frozen base model's ε-predictions on the same inputs
    and the noise ε that made x_t. Only `model_pred` needs a gradient."""
    e_theta = per_sample_mse(model_pred, noise)
    e_ref = per_sample_mse(ref_pred, noise)
    return DCOLoss(dco_loss(e_theta, e_ref, beta).mean(), e_theta.detach(), e_ref.detach())


def draw_photos(gen: torch.Generator, n: int, B: int, T: int, latent_shape):
    """The random part of a step: B subject photos drawn uniformly, each with its own timestep and noise.
    -> i [B], t [B], eps [B, *latent_shape]."""
    i = torch.randint(n, (B,), generator=gen)
    t = torch.randint(0, T, (B,), generator=gen)
    return i, t, torch.randn((B, *latent_shape), generator=gen)


# ---------------------------------------------------------------- the method

@dataclass
class DCOOptions(MethodOptions):
    # β of the DCO loss; the authors' --dcoloss_beta default. Its own flag, not RPO's --beta: the two are on scales
    # a thousand apart, and a --beta given to a comparison of both methods would otherwise set both.
    dco_beta: float = 1000.0

    def validate(self, need):
        need(self.dco_beta > 0, f"--dco-beta must be positive (got {self.dco_beta})")


class DCO(Method):
    """The DCO loss on the subject's photos, against the frozen base model."""

    name = "dco"
    Options = DCOOptions
    # lora_lr: the authors' --learning_rate for their LoRA runs; lr: without --lora (see the module docstring)
    defaults = {"lr": 5e-6, "lora_lr": 5e-5, "steps": 2000, "select": "last", "train_text_encoder": False}
    uses_reference = True
    diverged_hint = "lower --lr or --dco-beta, or use --precision fp32"

    def prepare(self):
        ctx = self.ctx
        with ctx.phase("latents"):
            self.latents = encode_images(ctx.sd.vae, ctx.subject.images, ctx.device)

    def draw(self, gen):
        ctx = self.ctx
        i, t, eps = draw_photos(gen, len(self.latents), ctx.cfg.batch_size, ctx.sd.scheduler.cfg.num_train_timesteps,
                                self.latents.shape[1:])
        return {"i": i, "t": t, "eps": eps}

    def inputs(self, batch):
        """x_t of each photo (forward process with its ε and t) and the subject's prompt. -> x_t, t, cond, eps."""
        ctx = self.ctx
        i, t, eps = batch["i"].to(ctx.device), batch["t"].to(ctx.device), batch["eps"].to(ctx.device)
        cond = ctx.text_states([ctx.subject.reference_prompt]).expand(len(i), -1, -1)
        return ctx.sd.scheduler.add_noise(self.latents[i], eps, t), t, cond, eps

    def loss(self, batch):
        ctx = self.ctx
        x_t, t, cond, eps = self.inputs(batch)
        with ctx.autocast():
            pred = ctx.policy_fwd(x_t, t, cond)
            with torch.no_grad():  # the base model: the same x_t, t and text (a constant in the graph)
                ref_pred = ctx.ref_fwd(x_t, t, cond)
        out = dco_objective(pred, ref_pred, eps, self.opt.dco_beta)
        return StepOutput(out.loss, {"e_theta": out.e_theta, "e_ref": out.e_ref, "t": batch["t"]})
