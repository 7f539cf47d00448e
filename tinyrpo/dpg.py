"""Look forward: personalization as a deterministic policy gradient (Wei et al., ECCV 2024, arXiv 2407.06642).

The U-Net is a deterministic policy whose action at a noisy latent x_t is its noise prediction ε̂. A small
learned critic Q_φ scores that action, and the U-Net is trained to lower Q_φ, the DPG update (Silver et al.
2014): the gradient reaches the U-Net through Q_φ, so the critic may regress anything, differentiable or not.

    look forward   x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t       the final image the action points at
    critic input   r = (x̂_0 − x_0)²                       elementwise, [B, 4, h, w]
    critic         Q_φ(r) = fc2(ReLU(fc(LeakyReLU_0.01(conv_3×3,4→1(r)))))   fc: h·w → 64, fc2: 64 → 1
    U-Net loss     L = λ_prior · L_prior + λ · γ^t · Q_φ(r)        (DreamBooth's prior term, tinyrpo/dreambooth.py)
    critic loss    (Q_φ(r) − cost)², one SGD step (lr 0.01, gradient norm clipped to 1) after each U-Net step,
                   on that step's r

`--dpg-reward lookforward` (the default; the authors' released code, train_dreambooth_dpg.py): the cost is the
look-forward MSE ‖x̂_0 − x_0‖², the mean over the latent's elements (F.mse_loss with reduction "mean"
there), and Q_φ(r) takes the place of DreamBooth's instance loss. Since x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,
‖x̂_0 − x_0‖² = (1−ᾱ_t)/ᾱ_t · ‖ε̂ − ε‖² (`lookforward_mse`): a critic that learned its target exactly
would make L DreamBooth's loss with the instance term weighted by γ^t (1−ᾱ_t)/ᾱ_t, which is what the
tests check the loss against (losses.weighted_mse).

`--dpg-reward dino` (the paper's DINO reward; its code was never released, see the README's Todo in the
authors' repository): the cost is 1 − cos(DINO(decode(x̂_0)), DINO(x_0's photo)), and the U-Net keeps
DreamBooth's instance loss: L = eq. 2 of DreamBooth + λ · γ^t · Q_φ(r), the paper's final gradient being the
reconstruction term plus λ·Q_φ. Every choice the paper leaves open, written down:
- the reference is the photo whose latent x_0 the step denoises (the critic sees the residual to that photo,
  so its target is the distance to that same photo), not the mean over all the subject's photos;
- the VAE decode runs every step, on the B instance rows only, without gradient (the reward only trains the
  critic; the U-Net's gradient goes through Q_φ), under the run's autocast; the decoded image is quantized to
  8 bits as a saved PNG would be, then DINO runs in fp32 with the evaluation's preprocessing (resize 256,
  center crop 224), with the weights of --dino (the evaluation's by default);
- λ = --dpg-weight 1.0 (the paper's sensitivity study found λ = 1 better than 0.1 for DINO), and γ^t is
  kept, as for the look-forward reward.

Shared choices. γ = 0.9986 (authors' code; γ^t halves the critic's weight by t ≈ 495); the critic runs in
fp32 outside autocast (the authors ran it in fp16), its weights start as the authors' do, uniform in
[0, 1/fan-in] (so Q_φ starts positive and increasing in every residual), drawn from --seed; the critic is
method state, saved with its SGD optimizer in last.pt, so --resume continues it exactly. Authors' training
defaults (train_dpg.sh, SD v1.4 in the paper): lr 1e-6, 1000 steps, 8 class images, text encoder trained,
batch 1 instance + 1 class image.

The critic's step: the authors' is plain SGD at lr 0.01. Its gradient grows with the residuals, which are
largest at large t ((1−ᾱ_t)/ᾱ_t ≈ 200 at t = 999), and one large step overshoots, the next larger still: on the toy
world (refs/toy, seed 2, toy preset) the critic's gradient norm went 0.1-5 → 29 → 658 → 3e6 and the loss was inf at
step 41; on the tests' random networks at step 3. tinyrpo clips the critic's gradient norm to --critic-clip 1.0
before that step (the U-Net's --grad-clip, applied to the critic), which leaves the usual steps as they are and
bounds the rare large one to lr·1: the toy comparison's six look-forward cells (refs/toy and refs/ball, seeds 0-2)
all finish, where the authors' step diverged on one (the README's look-forward section has the numbers).
--critic-clip 0 is the authors' unclipped step.

The paper's equations could not be read here (only the authors' code and a summary of the paper), so the
formulas above cite the code; the published numbers are in tinyrpo/evaluation/comparison.py.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyrpo.dreambooth import DreamBooth, DreamBoothOptions, dreambooth_loss
from tinyrpo.errors import UserError
from tinyrpo.formats.hub import missing_weights_message
from tinyrpo.method import StepOutput
from tinyrpo.runs.paths import DEFAULT_DINO

REWARDS = ("lookforward", "dino")


# ---------------------------------------------------------------- look forward

def look_forward(x_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t: the clean latent the prediction ε̂ points at (DDPM eq. 15 solved
    for x_0). alpha_bar: [B]. Float32, differentiable in ε̂."""
    a = alpha_bar.float().view(-1, *[1] * (x_t.ndim - 1))
    return (x_t.float() - (1 - a).sqrt() * eps_hat.float()) / a.sqrt()


def residual(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """r = (x̂_0 − x_0)², elementwise: the critic's input."""
    return (x0_hat - x0.float()) ** 2


def lookforward_mse(eps_hat: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """‖x̂_0 − x_0‖² (mean over C, H, W) per sample, by the identity (1−ᾱ_t)/ᾱ_t · mean (ε̂ − ε)²: [B].

    x_t = √ᾱ x_0 + √(1−ᾱ) ε gives x̂_0 − x_0 = √(1−ᾱ)/√ᾱ · (ε − ε̂). The look-forward reward's target."""
    a = alpha_bar.float()
    return (1 - a) / a * F.mse_loss(eps_hat.float(), eps.float(), reduction="none").flatten(1).mean(1)


def discount(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ^t: the weight of the critic's score at timestep t (γ = 1 weighs every timestep the same)."""
    return torch.full(t.shape, gamma, dtype=torch.float32, device=t.device).pow(t)


def dino_cost(emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """1 − cos(DINO(image), DINO(reference)), row by row: [B]. 0 for the same embedding, up to 2."""
    return 1 - F.cosine_similarity(emb.float(), ref_emb.float(), dim=-1)


# ---------------------------------------------------------------- the critic Q_φ

class Critic(nn.Module):
    """Q_φ: conv 3×3 (C → 1) → LeakyReLU(0.01) → linear (h·w → 64) → ReLU → linear (64 → 1), the authors'
    FullyConvRegressionModel sized from the latent (262,310 parameters at SD's 4×64×64 latents)."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=3, padding=1)
        self.fc = nn.Linear(height * width, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> "Critic":
        """The authors' initialization: every weight and bias uniform in [0, 1/n], n = 9 for the conv (its
        kernel area), h·w for fc and 64 for fc2."""
        for layer, n in ((self.conv, 9), (self.fc, self.fc.in_features), (self.fc2, self.fc2.in_features)):
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=generator) / n)
        return self

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r [B, C, h, w] -> Q [B]."""
        x = F.leaky_relu(self.conv(r), 0.01)
        x = F.relu(self.fc(x.flatten(1)))  # (B, h·w) -> (B, 64)
        return self.fc2(x).squeeze(1)


def critic_loss(q: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """The critic regresses the cost: mean (Q_φ(r) − cost)²."""
    return F.mse_loss(q, cost)


# ---------------------------------------------------------------- the method

@dataclass
class LookForwardOptions(DreamBoothOptions):
    num_class_images: int = 8            # authors' train_dpg.sh
    gamma: float = 0.9986                # γ (authors' code)
    critic_lr: float = 0.01              # SGD (authors' code)
    critic_clip: float = 1.0             # gradient-norm clip of the critic's step; 0: unclipped (authors')
    dpg_reward: str = "lookforward"      # what Q_φ regresses: "lookforward" (‖x̂_0 − x_0‖²) or "dino"
    dpg_weight: float = 1.0              # λ, the weight of γ^t·Q_φ in the U-Net's loss
    dino: str = DEFAULT_DINO             # DINO ViT-S/16 for --dpg-reward dino (the evaluation's)

    def validate(self, need):
        super().validate(need)
        need(0 < self.gamma <= 1, f"--gamma must be in (0, 1] (got {self.gamma})")
        need(self.critic_lr > 0, f"--critic-lr must be positive (got {self.critic_lr})")
        need(self.critic_clip >= 0, f"--critic-clip must be >= 0 (got {self.critic_clip})")
        need(self.dpg_reward in REWARDS, f"--dpg-reward must be one of {', '.join(REWARDS)} (got {self.dpg_reward!r})")
        need(self.dpg_weight >= 0, f"--dpg-weight must be >= 0 (got {self.dpg_weight})")


class LookForward(DreamBooth):
    """DreamBooth's data and prior term; a learned critic of the look-forward image replaces the instance loss."""

    name = "dpg"
    Options = LookForwardOptions
    defaults = {"lr": 1e-6, "steps": 1000, "select": "last", "train_text_encoder": True}
    diverged_hint = ("lower --critic-lr or --critic-clip (the critic's SGD step grows with the look-forward "
                     "residuals) or --lr, or use --precision fp32")

    def load(self):
        ctx, opt = self.ctx, self.opt
        vae = ctx.sd.vae
        side = ctx.cfg.resolution // vae.downsample_factor
        gen = torch.Generator().manual_seed(ctx.cfg.seed)
        self.critic = Critic(vae.cfg.latent_channels, side, side).reset_parameters(gen).to(ctx.device)
        self.critic_opt = torch.optim.SGD(self.critic.parameters(), lr=opt.critic_lr)
        self.dino = None
        if opt.dpg_reward == "dino":
            from tinyrpo.formats.weights import load_dino
            if not Path(opt.dino).exists():
                raise UserError(missing_weights_message("dino", opt.dino, "--dino"))
            with ctx.phase("load"):
                self.dino = load_dino(opt.dino, device=ctx.device, dtype=torch.float32).eval().requires_grad_(False)

    def prepare(self):
        super().prepare()
        if self.dino is not None:
            with self.ctx.phase("latents"):
                self.ref_dino = self.dino_embed(self.ctx.subject.images)  # one per photo, [n_instance, D]

    @torch.no_grad()
    def dino_embed(self, images) -> torch.Tensor:
        from tinyrpo.dino import dino_preprocess
        x = dino_preprocess(images, self.dino.config.image_size).to(self.ctx.device)
        with torch.autocast(self.ctx.device.type, enabled=False):  # fp32: the cost is a small difference
            return self.dino(x).float()

    def loss(self, batch):
        ctx, opt = self.ctx, self.opt
        x_t, t, cond, eps, x0 = self.inputs(batch)
        B = len(batch["i"])
        with ctx.autocast():
            pred = ctx.policy_fwd(x_t, t, cond)
        # DreamBooth's eq. 2 without its instance term (look forward: the critic replaces it), or with it (dino)
        db = dreambooth_loss(pred, eps, B, opt.prior_weight, instance_weight=float(opt.dpg_reward == "dino"))
        ab = ctx.sd.scheduler.alpha_bar(t[:B], pred.device)
        x0_hat = look_forward(x_t[:B], pred[:B], ab)
        r = residual(x0_hat, x0[:B])
        with torch.autocast(ctx.device.type, enabled=False):
            q = self.critic(r)
        loss = db.loss + opt.dpg_weight * (discount(t[:B], opt.gamma) * q).mean()
        # what after_step trains the critic on: this step's residual and its cost, before the U-Net moves
        batch["r"], batch["x0_hat"] = r.detach(), x0_hat.detach()
        batch["lookforward"] = lookforward_mse(pred[:B].detach(), eps[:B], ab)
        return StepOutput(loss, {"l_prior": db.l_prior, "l_instance": db.l_instance, "q": q.detach(),
                                 "lookforward_mse": batch["lookforward"], "t": batch["t"]})

    def cost(self, batch) -> torch.Tensor:
        """What Q_φ regresses for this step's rows: the look-forward MSE, or the DINO cost of the decoded x̂_0."""
        if self.dino is None:
            return batch["lookforward"]
        from tinyrpo.pipeline import to_pil
        ctx = self.ctx
        with torch.no_grad(), ctx.autocast():
            images = ctx.sd.vae.decode_latents(batch["x0_hat"])
        emb = self.dino_embed(to_pil((images.float() + 1) / 2))  # [-1, 1] -> 8-bit images
        return dino_cost(emb, self.ref_dino[batch["i"].to(ctx.device)])

    def after_step(self, batch, out):
        """One SGD step of the critic on this step's (r, cost), its gradient norm clipped to --critic-clip (0: the
        authors' unclipped step). The U-Net's backward also reached the critic's weights; those gradients are not
        the critic's objective and are dropped first (as the authors do)."""
        cost = self.cost(batch)
        self.critic_opt.zero_grad(set_to_none=True)
        with torch.autocast(self.ctx.device.type, enabled=False):
            lq = critic_loss(self.critic(batch["r"]), cost)
        lq.backward()
        # returns the norm before clipping (logged); an infinite bound scales by exactly 1: the authors' step
        norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.opt.critic_clip or float("inf"))
        self.critic_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        out.terms.update({"critic_loss": lq.detach(), "cost": cost.detach(), "critic_grad_norm": norm.detach()})

    def state_dict(self):
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.critic_opt.state_dict()}

    def load_state_dict(self, state):
        self.critic.load_state_dict(state["critic"])
        self.critic_opt.load_state_dict(state["critic_optimizer"])
