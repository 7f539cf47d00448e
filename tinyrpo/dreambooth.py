"""DreamBooth with prior preservation (Ruiz et al. 2023, arXiv 2208.12242), the baseline RPO is measured against.

Each step denoises one subject photo conditioned on "a photo of sks dog" (the instance loss) and one image
the base model made of "a photo of a dog" (the prior-preservation loss, which keeps the class from
collapsing onto the subject and keeps the model's other dogs), each with its own noise and timestep:

    L = E[‖ε − ε_θ(x_t, t, c)‖²] + λ · E[‖ε' − ε_θ(x'_t', t', c_pr)‖²]                         (eq. 2)

written, as diffusers' train_dreambooth.py and Stable Diffusion do, with the ε-prediction error rather than
the paper's x̂_0 error (the two differ by a per-timestep weight w_t that ε-prediction folds in). Defaults are
diffusers' DreamBooth guide for SD v1.5 (examples/dreambooth/README.md, "with prior-preservation loss"):
lr 5e-6 constant, 800 steps, 200 class images, λ = 1, batch 1 instance + 1 class image, the U-Net only
(`--train-text-encoder` adds the text encoder, as the RPO paper's DreamBooth row does; the guide then uses lr
2e-6). The published baselines run a fixed number of steps, so the checkpoint is the last step (`--select best`
keeps the validation-reward argmax instead, as RPO does).

Choices where the guide's script differs:
- instance and class images are drawn uniformly with replacement from the run's generator (diffusers walks
  a shuffled epoch of max(#instance, #class) indices): the same frequencies in expectation, and a resumed
  run draws the very same sequence;
- x_0 is the VAE posterior mean, computed once (diffusers samples the posterior every step), as for RPO;
- class image k is generated with seed --seed + k (50 DDIM steps, guidance 7.5: tinyrpo.pipeline's
  defaults, as diffusers' pipeline), so a run with fewer class images uses the first ones of a longer run.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tinyrpo import kernels
from tinyrpo.losses import per_sample_mse, weighted_mse
from tinyrpo.method import Method, MethodOptions, StepOutput, encode_images, generated_images

CLASS_PROMPT = "a photo of a {}"  # the class prompt c_pr (the subject's is dreambench.REFERENCE_PROMPT)
MAX_CLASS_IMAGES = 5000  # class image k uses seed + k; the seed bound leaves 10,000 (tinyrpo.config.MAX_SEED)


# ---------------------------------------------------------------- the loss (eq. 2)

def prior_preservation_loss(e_instance: torch.Tensor, e_class: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """Eq. (2): mean instance error + λ · mean class-prior error. e_*: per-sample denoising errors [B]."""
    return e_instance.mean() + prior_weight * e_class.mean()


def row_weights(n_instance: int, n_class: int, prior_weight: float, instance_weight: float = 1.0,
                device=None) -> torch.Tensor:
    """Per-row weights w such that mean_n w_n·e_n over the rows [instances..., class images...] is eq. (2):
    the form of losses.weighted_mse (and of its fused kernel). w = N/n_instance on instance rows and
    λ·N/n_class on class rows, N = n_instance + n_class. (instance_weight scales the instance term: the
    look-forward method replaces it by its critic, tinyrpo/dpg.py, with instance_weight 0.)"""
    n = n_instance + n_class
    return torch.cat([torch.full((n_instance,), instance_weight * n / n_instance, device=device),
                      torch.full((n_class,), prior_weight * n / n_class, device=device)])


class DreamBoothLoss(NamedTuple):
    loss: torch.Tensor        # scalar, eq. (2)
    l_instance: torch.Tensor  # scalar, mean instance error (no gradient: for the log)
    l_prior: torch.Tensor     # scalar, mean class-prior error (no gradient: for the log)


def dreambooth_loss(model_pred: torch.Tensor, noise: torch.Tensor, n_instance: int, prior_weight: float,
                    instance_weight: float = 1.0) -> DreamBoothLoss:
    """Eq. (2) for rows [instances..., class images...], as one weighted MSE over the rows."""
    n_class = model_pred.shape[0] - n_instance
    w = row_weights(n_instance, n_class, prior_weight, instance_weight, device=model_pred.device)
    # On a GPU the same arithmetic runs fused into Triton kernels (tinyrpo/kernels.py, tested equal).
    loss_fn = kernels.fused_weighted_mse if kernels.available(model_pred) else weighted_mse
    loss = loss_fn(model_pred, noise, w)
    with torch.no_grad():
        e = per_sample_mse(model_pred, noise)
    return DreamBoothLoss(loss, e[:n_instance].mean(), e[n_instance:].mean())


def draw_instance_and_class(gen: torch.Generator, n_instance: int, n_class: int, B: int, T: int, latent_shape):
    """The random part of a step: B subject photos and B class images drawn uniformly, and for each of the 2B
    rows its own timestep and noise (eq. 2 has independent t, ε and t', ε'; diffusers draws them per row).
    -> i [B], k [B], t [2B], eps [2B, *latent_shape]: instance rows first."""
    i = torch.randint(n_instance, (B,), generator=gen)
    k = torch.randint(n_class, (B,), generator=gen)
    t = torch.randint(0, T, (2 * B,), generator=gen)
    return i, k, t, torch.randn((2 * B, *latent_shape), generator=gen)


# ---------------------------------------------------------------- the method

@dataclass
class DreamBoothOptions(MethodOptions):
    num_class_images: int = 200   # diffusers' guide (the paper generates ~1000)
    prior_weight: float = 1.0     # λ of eq. (2)

    def validate(self, need):
        need(1 <= self.num_class_images <= MAX_CLASS_IMAGES,
             f"--num-class-images must be between 1 and {MAX_CLASS_IMAGES} (got {self.num_class_images})")
        need(self.prior_weight >= 0, f"--prior-weight must be >= 0 (got {self.prior_weight})")


class DreamBooth(Method):
    """Instance loss on the subject photos + prior preservation on the base model's class images (eq. 2)."""

    name = "dreambooth"
    Options = DreamBoothOptions
    defaults = {"lr": 5e-6, "steps": 800, "select": "last", "train_text_encoder": False}

    @property
    def class_prompt(self) -> str:
        return CLASS_PROMPT.format(self.ctx.subject.class_noun)

    def prepare(self):
        ctx = self.ctx
        # One prompt slot per image (seed + k), so the cache is saved every --gen-batch-size images and an
        # interrupted generation resumes where it stopped.
        images, _ = generated_images(ctx, "class_images", [self.class_prompt] * self.opt.num_class_images, 1,
                                     ctx.cfg.seed, "class images")
        with ctx.phase("latents"):
            self.instance_latents = encode_images(ctx.sd.vae, ctx.subject.images, ctx.device)
            self.class_latents = encode_images(ctx.sd.vae, images, ctx.device)

    def draw(self, gen):
        ctx = self.ctx
        i, k, t, eps = draw_instance_and_class(gen, len(self.instance_latents), len(self.class_latents),
                                               ctx.cfg.batch_size, ctx.sd.scheduler.cfg.num_train_timesteps,
                                               self.instance_latents.shape[1:])
        return {"i": i, "k": k, "t": t, "eps": eps}

    def inputs(self, batch):
        """The U-Net inputs: x_t of each row (forward process of its x_0 with its own ε and t) and its
        conditioning, the subject's prompt for instance rows and the class prompt for class rows.
        -> x_t, t, cond, eps, x_0."""
        ctx = self.ctx
        i, k = batch["i"].to(ctx.device), batch["k"].to(ctx.device)
        t, eps = batch["t"].to(ctx.device), batch["eps"].to(ctx.device)
        x0 = torch.cat([self.instance_latents[i], self.class_latents[k]])
        states = ctx.text_states([ctx.subject.reference_prompt, self.class_prompt])
        cond = torch.cat([states[0:1].expand(len(i), -1, -1), states[1:2].expand(len(k), -1, -1)])
        return ctx.sd.scheduler.add_noise(x0, eps, t), t, cond, eps, x0

    def loss(self, batch):
        ctx = self.ctx
        x_t, t, cond, eps, _ = self.inputs(batch)
        with ctx.autocast():
            pred = ctx.policy_fwd(x_t, t, cond)
        out = dreambooth_loss(pred, eps, len(batch["i"]), self.opt.prior_weight)
        return StepOutput(out.loss, {"l_instance": out.l_instance, "l_prior": out.l_prior, "t": batch["t"]})
