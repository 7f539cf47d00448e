"""Reward Preference Optimization (Miao et al. 2024, arXiv 2407.12164), equation by equation.

The reward (eq. 5) scores images; Bradley–Terry (eq. 6) turns two rewards into a random preference label;
the loss (eqs. 7–9) is a denoising similarity term on the reference image plus a DPO-style preference term
(as in Diffusion-DPO, Wallace et al. 2023) comparing the policy U-Net with the frozen base U-Net.
Each is a small pure function. Below them, `RPO` is the method the shared loop (tinyrpo/trainer.py) runs:
the negative set and its rewards (prepare), the pair and label of a step (draw), eqs. 7-9 (loss), and, beyond the
paper, the negative set remade by the policy every --refresh-negatives K steps (refresh_negatives).
"""
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyrpo import kernels
from tinyrpo.losses import per_sample_mse
from tinyrpo.method import Method, MethodOptions, StepOutput, encode_images, generated_images, read_generated
from tinyrpo.runs.atomic import atomic_write_json


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


def arithmetic_reward(a_i: torch.Tensor, a_t: torch.Tensor, lam: float) -> torch.Tensor:
    """λ-Arithmetic reward, the paper's Table 6 ablation: λ·ALIGN-I + (1 − λ)·ALIGN-T."""
    return lam * a_i + (1.0 - lam) * a_t


REWARD_MEANS = {"harmonic": harmonic_reward, "arithmetic": arithmetic_reward}  # train.py --mean


# ---------------------------------------------------------------- preference labels (eq. 6)

def preference_probability(h_w: torch.Tensor, h_l: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Bradley–Terry, eq. (6): p(w ≻ l) = σ(h(w) − h(l)).

    `temperature` τ is beyond the paper (--label-temperature, issue 21): p = σ((h(w) − h(l)) / τ), τ = 1 being
    eq. 6. With h ∈ [0, 1], eq. 6 stays within [σ(−1), σ(1)] = [0.27, 0.73], close to coin flips; τ < 1
    sharpens the labels toward the reward's ranking.
    """
    return torch.sigmoid((h_w - h_l) / temperature)


def hard_preference_probability(h_w: torch.Tensor, h_l: torch.Tensor) -> torch.Tensor:
    """Hard labels, beyond the paper (--labels hard): p = [h(w) > h(l)], the τ → 0 limit of eq. (6) above.

    A tie, h(w) = h(l), is that limit too: p = 1/2, a fair coin, so a tie favours neither side.
    """
    return (torch.sign(h_w - h_l) + 1) / 2


def sample_label(h_w: torch.Tensor, h_l: torch.Tensor, generator: torch.Generator | None = None,
                 temperature: float = 1.0, hard: bool = False) -> torch.Tensor:
    """y ~ Bernoulli(p(w ≻ l)): 1 means "w is preferred". Re-drawn every time a pair is used.

    p is eq. (6) (at `temperature`), or with `hard` the hard label: 1.0 or 0.0 outright (u ∈ [0, 1) is below
    1 and never below 0), a coin flip at a tie. Both consume the same uniform draw, so the run's random
    stream does not depend on the labels' kind.
    """
    p = hard_preference_probability(h_w, h_l) if hard else preference_probability(h_w, h_l, temperature)
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
    (generated images) in the second; `noise` is each row's own ε (the two halves are equal when the pair
    shares ε and t, tinyrpo's default). y: [B] labels. Only `model_pred` needs a gradient.
    """
    e_theta_w, e_theta_l = per_sample_mse(model_pred, noise).chunk(2)
    e_ref_w, e_ref_l = per_sample_mse(ref_pred, noise).chunk(2)
    d = delta(e_theta_w, e_theta_l, e_ref_w, e_ref_l)
    sim = l_sim(e_theta_w).mean()
    pref = l_pref(d, y.float(), beta).mean()
    return RPOLoss(sim + pref, sim, pref, d)


# ---------------------------------------------------------------- the method

@dataclass
class RPOOptions(MethodOptions):
    beta: float = 1.0                # β of eq. (8)
    lambda_train: float = 0.0        # λ of the reward behind the labels; the authors' 0: text alignment only
    images_per_prompt: int = 4       # negative set: 8 prompts × 4 = 32 images (paper)
    pref: bool = True                # False: pure L_sim (--no-pref, the paper's Table 2 ablation)
    sim: bool = True                 # False: L_pref alone (--no-sim, the DPO-only variant of the appendix)
    # Which prompt the reference image w is scored against for its reward h(w): "pair" (the training prompt
    # of the loser it is paired with, as the authors' code does) or "reference" ("a photo of sks dog"). With
    # λ_train = 0 this decides whether labels push toward the prompt or toward the reference.
    # "shared": one ε and one t per pair (Diffusion-DPO); "independent": drawn for w and l separately (the
    # paper's eq. 4 and the authors' code).
    # Measured in the toy world (README, Choices; kept checkpoints' exact score, paired over 2 subjects × 3
    # seeds): reference − pair −0.006 ± 0.023, within noise, so the authors' "pair"; independent − shared
    # −0.058 ± 0.022, shared better, so "shared".
    winner_prompt: str = "pair"
    noise: str = "shared"
    # Beyond the paper (issue 21), each at the paper's behaviour by default; measured by
    # `python -m tinyrpo.toy experiment beyond` (docs/methods.md).
    label_temperature: float = 1.0   # τ of the labels: p = σ((h(w) − h(l)) / τ); 1 is eq. (6)
    labels: str = "soft"             # "soft": y ~ Bernoulli(p), eq. (6); "hard": y = [h(w) > h(l)]
    refresh_negatives: int = 0       # K: the negative set made again by the policy every K steps; 0: never (paper)

    def validate(self, need):
        need(self.beta > 0, f"--beta must be positive (got {self.beta})")
        need(0.0 <= self.lambda_train <= 1.0, f"--lambda-train must be in [0, 1] (got {self.lambda_train})")
        need(self.images_per_prompt >= 1, f"--images-per-prompt must be at least 1 (got {self.images_per_prompt})")
        need(self.pref or self.sim, "--no-pref and --no-sim together leave no loss; drop one of them")
        need(self.winner_prompt in ("reference", "pair"),
             f"--winner-prompt must be reference or pair (got {self.winner_prompt!r})")
        need(self.noise in ("shared", "independent"), f"--noise must be shared or independent (got {self.noise!r})")
        need(self.label_temperature > 0, f"--label-temperature must be positive (got {self.label_temperature})")
        need(self.labels in ("soft", "hard"), f"--labels must be soft or hard (got {self.labels!r})")
        need(self.labels == "soft" or self.label_temperature == 1.0,
             "--label-temperature sets soft labels' sharpness and hard labels have none; drop one of them")
        need(self.refresh_negatives >= 0,
             f"--refresh-negatives must be a number of steps, or 0 for never (got {self.refresh_negatives})")
        need(self.pref or not self.refresh_negatives,
             "--refresh-negatives with --no-pref would remake negatives that pure L_sim never uses; drop one of them")


def draw_pairs(gen: torch.Generator, n_w: int, n_l: int, B: int, T: int, latent_shape, shared_noise: bool):
    """The random part of a step, eq. (4): B pairs (i, j) drawn uniformly, a timestep and noise per image.

    -> i [B], j [B], t [2B], eps [2B, *latent_shape]: winners' rows first, losers' second. With
    `shared_noise` the loser's t and ε are the winner's (Diffusion-DPO compares the two images on the
    same noisy step, so Δ measures the images and not the noise draws).
    """
    i = torch.randint(n_w, (B,), generator=gen)
    j = torch.randint(n_l, (B,), generator=gen)
    if shared_noise:
        t = torch.randint(0, T, (B,), generator=gen)
        eps = torch.randn((B, *latent_shape), generator=gen)
        return i, j, torch.cat([t, t]), torch.cat([eps, eps])
    t = torch.randint(0, T, (2 * B,), generator=gen)
    return i, j, t, torch.randn((2 * B, *latent_shape), generator=gen)


def rpo_forward(policy, ref, x_t, t, cond, noise, y, beta: float, autocast) -> RPOLoss:
    """Policy and frozen-reference predictions on the same noisy inputs, then the RPO loss (eqs. 7-9).

    `policy`/`ref` are callables (sample, t, context) -> ε̂: tinyrpo U-Nets, compiled or not, or the same
    U-Net with its LoRA adapters on and off (bench/train_step.py passes diffusers' U-Net the same way).
    The loss runs outside autocast with float32 accumulation.
    """
    with autocast:
        model_pred = policy(x_t, t, cond)
        # no_grad rather than inference_mode: the reference prediction enters the loss's autograd graph
        # (as a constant), and an inference-mode tensor may not be saved for backward by the fused op.
        with torch.no_grad():
            ref_pred = ref(x_t, t, cond)
    # Eq. 9 is rpo_loss above; on a GPU the same arithmetic runs fused into Triton kernels (tinyrpo/kernels.py,
    # tested equal to rpo_loss), which read each [2B, 4, 64, 64] tensor once instead of about ten times.
    loss_fn = kernels.fused_rpo_loss if kernels.available(model_pred) else rpo_loss
    return RPOLoss(*loss_fn(model_pred, ref_pred, noise, y, beta))


def refresh_folder(step: int) -> str:
    """Where the negative set remade by the policy of `step` is kept, in the run folder."""
    return f"refresh/step_{step:05d}"


class RPO(Method):
    """Reward Preference Optimization: L_sim on the reference images + a DPO loss against the base model."""

    name = "rpo"
    Options = RPOOptions
    defaults = {"lr": 5e-6, "steps": 400, "select": "best", "train_text_encoder": False}
    uses_reference = True

    def prepare(self):
        ctx, opt = self.ctx, self.opt
        negatives, l_prompt = generated_images(ctx, "negatives", ctx.prompts, opt.images_per_prompt, ctx.cfg.seed,
                                               "negative set")
        self.l_prompt = torch.tensor(l_prompt)
        with ctx.phase("rewards"):
            # h for each reference image and each generated image (eq. 5), with the training λ
            refs = ctx.subject.images
            if opt.winner_prompt == "reference":
                h_w = ctx.reward(refs, [ctx.subject.reference_prompt] * len(refs), opt.lambda_train).reward
            else:  # one reward per (reference image, training prompt): [n_w, P]
                h_w = torch.stack([ctx.reward(refs, [p] * len(refs), opt.lambda_train).reward
                                   for p in ctx.prompts], 1)
            self.h_w = h_w.cpu()
            self.use_negatives(negatives)
            atomic_write_json(ctx.out / "rewards.json", {"lambda_train": opt.lambda_train,
                                                         "winner_prompt": opt.winner_prompt,
                                                         "reference": self.h_w.tolist(), "negatives": self.h_l.tolist()})
            # Everything a step needs, computed once: latents of both sides of a pair.
            self.w_latents = encode_images(ctx.sd.vae, refs, ctx.device)
        # --refresh-negatives: steps done, and the step whose policy made the set in use (0: the base model)
        self.steps_done, self.negatives_step = 0, 0

    def use_negatives(self, images):
        """The loser side of the pairs: each generated image's reward h(l) (eq. 5, against the training prompt
        it was made from) and its latent. The labels are drawn from h at every step, so they follow."""
        ctx = self.ctx
        prompts = [ctx.prompts[p] for p in self.l_prompt.tolist()]
        self.h_l = ctx.reward(images, prompts, self.opt.lambda_train).reward.cpu()
        self.l_latents = encode_images(ctx.sd.vae, images, ctx.device)

    def refresh_negatives(self):
        """On-policy negatives (--refresh-negatives K), the paper's "online" future work: the negative set made
        again by the current policy (LoRA or full) with prepare's recipe — the same prompts, images per prompt
        and seeds — and its rewards recomputed. Kept in RUN/refresh/step_NNNNN/ (images, index.json,
        rewards.json), which a resumed run reads back instead of remaking with weights it no longer has."""
        ctx, step = self.ctx, self.steps_done
        folder = refresh_folder(step)
        t0 = time.perf_counter()
        images, _ = generated_images(ctx, folder, ctx.prompts, self.opt.images_per_prompt, ctx.cfg.seed,
                                     f"negatives @ {step}", policy_step=step)
        with ctx.phase("refresh"):
            self.use_negatives(images)
            atomic_write_json(ctx.out / folder / "rewards.json", {"step": step, "negatives": self.h_l.tolist()})
        self.negatives_step = step
        tqdm.write(f"negative set remade by the policy of step {step} in {time.perf_counter() - t0:.2f} s "
                   f"({len(images)} images, {ctx.out / folder})")

    def draw(self, gen):
        ctx, B, K = self.ctx, self.ctx.cfg.batch_size, self.opt.refresh_negatives
        # The steps after step n·K use the set of step n·K's policy, made here when first needed: a run that
        # ends at step n·K makes none, and resumed with more --steps it makes it now, as the uninterrupted run.
        if K and self.steps_done % K == 0 and self.negatives_step != self.steps_done:
            self.refresh_negatives()
        i, j, t, eps = draw_pairs(gen, len(self.w_latents), len(self.l_latents), B,
                                  ctx.sd.scheduler.cfg.num_train_timesteps, self.w_latents.shape[1:],
                                  self.opt.noise == "shared")
        h_w = self.h_w[i] if self.h_w.ndim == 1 else self.h_w[i, self.l_prompt[j]]
        # eq. (6), re-drawn every time a pair is used (--label-temperature, --labels hard: beyond the paper)
        y = sample_label(h_w, self.h_l[j], generator=gen, temperature=self.opt.label_temperature,
                         hard=self.opt.labels == "hard")
        return {"i": i, "j": j, "t": t, "eps": eps, "y": y}

    def after_step(self, batch, out):
        self.steps_done += 1

    def state_dict(self):
        return {"steps_done": self.steps_done, "negatives_step": self.negatives_step}

    def load_state_dict(self, state):
        # a last.pt from before --refresh-negatives has no state: its runs never refresh, so the counts do not matter
        self.steps_done, self.negatives_step = state.get("steps_done", 0), state.get("negatives_step", 0)
        if self.negatives_step:
            self.use_negatives(read_generated(self.ctx, refresh_folder(self.negatives_step)))

    def inputs(self, batch):
        """The U-Net inputs of a step: x_t of both sides (forward process of x_0 with the drawn ε, t) and
        their conditioning — the reference prompt for w, the loser's own training prompt for l."""
        ctx = self.ctx
        i, j = batch["i"].to(ctx.device), batch["j"].to(ctx.device)
        t, eps = batch["t"].to(ctx.device), batch["eps"].to(ctx.device)
        x0 = torch.cat([self.w_latents[i], self.l_latents[j]])
        states = ctx.text_states([ctx.subject.reference_prompt] + ctx.prompts)
        cond = torch.cat([states[0:1].expand(len(i), -1, -1), states[1:][self.l_prompt.to(ctx.device)[j]]])
        return ctx.sd.scheduler.add_noise(x0, eps, t), t, cond, eps

    def loss(self, batch):
        ctx, opt = self.ctx, self.opt
        x_t, t, cond, eps = self.inputs(batch)
        y = batch["y"].to(ctx.device)
        out = rpo_forward(ctx.policy_fwd, ctx.ref_fwd, x_t, t, cond, eps, y, opt.beta, ctx.autocast())
        loss = out.loss if (opt.pref and opt.sim) else (out.l_sim if opt.sim else out.l_pref)
        return StepOutput(loss, {"l_sim": out.l_sim, "l_pref": out.l_pref, "delta": out.delta, "label": y,
                                 "t": batch["t"]})
