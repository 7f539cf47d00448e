"""DreamBooth and look forward: each formula on hand-computed tensors, and what a step really feeds the U-Net.

Oracles are independent of the code under test: values worked out by hand, diffusers' noise schedule and
VAE, transformers' CLIP text model and ViT (DINO), all reading the same tiny checkpoint files.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, ViTModel

import train
from tests.fixtures import make_tiny_dino
from tests.test_train import RES, base_args, make_subject, models  # noqa: F401  (models is a fixture)
from tinyrpo import kernels
from tinyrpo.data import to_tensor
from tinyrpo.dino import dino_preprocess
from tinyrpo.dpg import (Critic, critic_loss, dino_cost, discount, look_forward, lookforward_mse, residual)
from tinyrpo.dreambooth import dreambooth_loss, prior_preservation_loss, row_weights
from tinyrpo.losses import weighted_mse
from tinyrpo.schedulers import NoiseSchedule
from tinyrpo.config import TrainConfig
from tinyrpo.trainer import Trainer

ONE_PROMPT = "a [V] {cls} on the beach\n"


# ------------------------------------------------------------------------------------ DreamBooth (eq. 2)

def rows(offsets, shape=(4, 3, 3), seed=0):
    """(pred, eps) whose per-row mean squared error is offsets[n]²: pred = eps + offsets[n]."""
    eps = torch.randn(len(offsets), *shape, generator=torch.Generator().manual_seed(seed))
    return eps + torch.tensor(offsets).view(-1, 1, 1, 1), eps


def test_prior_preservation_weighting_by_hand():
    pred, eps = rows([1.0, 2.0, 3.0, 0.5])  # instance errors 1, 4; class errors 9, 0.25
    pred.requires_grad_(True)
    out = dreambooth_loss(pred, eps, n_instance=2, prior_weight=0.5)
    # eq. 2: mean(1, 4) + 0.5 · mean(9, 0.25) = 2.5 + 2.3125
    assert out.loss.item() == pytest.approx(4.8125, rel=1e-6)
    assert (out.l_instance.item(), out.l_prior.item()) == pytest.approx((2.5, 4.625), rel=1e-6)
    assert prior_preservation_loss(torch.tensor([1.0, 4.0]), torch.tensor([9.0, 0.25]), 0.5).item() == 4.8125
    # the weights the fused kernel gets: N / n_instance on instance rows, λ·N / n_class on class rows
    assert row_weights(2, 2, 0.5).tolist() == [2.0, 2.0, 1.0, 1.0]
    assert row_weights(1, 3, 1.0).tolist() == pytest.approx([4.0, 4 / 3, 4 / 3, 4 / 3])
    assert row_weights(2, 2, 0.5, instance_weight=0.0).tolist() == [0.0, 0.0, 1.0, 1.0]
    # the gradient: row n gets w_n / N · 2(pred − ε) / D; here (pred − ε) = offset everywhere, D = 36
    out.loss.backward()
    want = torch.tensor([2.0 / 4 * 2 * 1.0, 2.0 / 4 * 2 * 2.0, 1.0 / 4 * 2 * 3.0, 1.0 / 4 * 2 * 0.5]) / 36
    assert torch.allclose(pred.grad, want.view(-1, 1, 1, 1).expand_as(pred), rtol=1e-5)


def test_weighted_mse_kernel_equals_the_readable_loss():
    """The fused kernel (Triton, interpreted on the CPU) against losses.weighted_mse, value and gradient."""
    pred, eps = rows([0.3, -1.2, 2.0, 0.7], shape=(4, 8, 8), seed=1)
    pred = pred + 0.1 * torch.randn(pred.shape, generator=torch.Generator().manual_seed(2))
    w = row_weights(2, 2, 0.7)
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    fused = kernels.fused_weighted_mse(a, eps, w)
    ref = weighted_mse(b, eps, w)
    fused.backward()
    ref.backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------ look forward

def test_look_forward_and_the_identity():
    sched, ours = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"), NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 250, 500, 750, 999])
    x0, eps, eps_hat = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    ab = sched.alphas_cumprod[t]  # diffusers' ᾱ
    x_t = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    x0_hat = look_forward(x_t, eps_hat, ours.alpha_bar(t))
    # by hand: x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ, in float64
    a = ab.double().view(-1, 1, 1, 1)
    want = (x_t.double() - (1 - a).sqrt() * eps_hat.double()) / a.sqrt()
    assert ((x0_hat.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    # ‖x̂_0 − x_0‖² = (1−ᾱ)/ᾱ · ‖ε̂ − ε‖², per sample (mean over elements)
    direct = residual(x0_hat, x0).flatten(1).mean(1)
    assert lookforward_mse(eps_hat, eps, ours.alpha_bar(t)).tolist() == pytest.approx(direct.tolist(), rel=1e-4)
    # a hand value: ε̂ − ε = 1 everywhere gives (1−ᾱ)/ᾱ at t = 500
    a500 = float(sched.alphas_cumprod[500])
    one = lookforward_mse(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), ours.alpha_bar(torch.tensor([500])))
    assert one.item() == pytest.approx((1 - a500) / a500, rel=1e-6)


def test_discount_by_hand():
    t = torch.tensor([0, 1, 495, 999])
    assert discount(t, 0.9986).tolist() == pytest.approx([1.0, 0.9986, 0.9986 ** 495, 0.9986 ** 999], rel=1e-5)
    assert discount(t, 1.0).tolist() == [1.0] * 4


@pytest.mark.parametrize("side, count", [(64, 37 + 64 * 64 * 64 + 64 + 65), (16, 37 + 256 * 64 + 64 + 65)])
def test_critic_shapes_and_parameter_count(side, count):
    critic = Critic(4, side, side).reset_parameters(torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in critic.parameters())
    assert n == count
    if side == 64:
        assert n == 262_310  # "0.26 M parameters" at SD's 64×64 latents
    assert critic(torch.rand(3, 4, side, side)).shape == (3,)
    # the authors' initialization: uniform in [0, 1/n]
    for p, bound in ((critic.conv.weight, 1 / 9), (critic.fc.weight, 1 / side ** 2), (critic.fc2.weight, 1 / 64)):
        assert 0 <= p.min() and p.max() <= bound and p.max() > 0.9 * bound


def test_critic_forward_by_hand():
    """conv → LeakyReLU(0.01) → fc → ReLU → fc2, on weights chosen so each step shows in the result."""
    critic = Critic(2, 2, 2)
    with torch.no_grad():
        for p in critic.parameters():
            p.zero_()
        critic.conv.weight[0, 0, 1, 1] = 1.0          # the centre tap of channel 0: h = r[:, 0]
        critic.fc.weight[0] = 1.0                      # unit 0 sums h, unit 1 sums −h
        critic.fc.weight[1] = -1.0
        critic.fc2.weight[0, :2] = torch.tensor([2.0, 5.0])
        critic.fc2.bias.fill_(0.5)
    r = torch.zeros(2, 2, 2, 2)
    r[0, 0] = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # LeakyReLU: 1 − 0.02 + 3 = 3.98
    r[1, 0] = torch.tensor([[-100.0, 0.0], [0.0, 0.0]])  # −1: only unit 1 passes the ReLU
    r[:, 1] = 7.0  # channel 1 has no weight
    assert critic(r).tolist() == pytest.approx([2 * 3.98 + 0.5, 5 * 1.0 + 0.5], rel=1e-6)
    assert critic_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(2.5)


def test_dino_cost_by_hand():
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0], [-3.0, 0.0]])
    ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert dino_cost(e, ref).tolist() == pytest.approx([1.0, 0.0, 1 - 2 ** -0.5, 2.0], abs=1e-6)


# ------------------------------------------------------------------------------------ what a step feeds the U-Net

class Recorder:
    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t, c):
        out = self.net(x, t, c)
        self.calls.append((x.detach().clone(), t.clone(), c.detach().clone(), out))
        return out


def record(tr, *names, recorder=Recorder):
    """Wrap the forwards `names` (policy_fwd, ref_fwd) in recorders where the method calls them, its RunContext;
    the trainer's attributes name the same recorders, for the asserts."""
    wrapped = {n: recorder(getattr(tr.method.ctx, n)) for n in names}
    tr.method.ctx = dataclasses.replace(tr.method.ctx, **wrapped)
    for n, r in wrapped.items():
        setattr(tr, n, r)


def method_args(models, subject, out, method, *extra, prompts=None):
    args = base_args(models, subject, out, "--method", method, *extra)
    if method != "rpo":  # the negative set's size is RPO's setting
        i = args.index("--images-per-prompt")
        del args[i:i + 2]
    if prompts is not None:
        args += ["--prompts", str(prompts)]
    return args


def make_trainer(models, subject, out, method, *extra) -> Trainer:
    args, given = train.parse_args(method_args(models, subject, out, method, "--steps", "2", *extra))
    tr = Trainer(TrainConfig.from_args(args), given)
    tr.check_run_folder()
    tr.load()
    tr.start_run_folder()
    tr.ref_embs = tr.scorer.embed_images(tr.subject.images)
    tr.method.prepare()
    return tr


@pytest.fixture(scope="module")
def oracles(models):
    sd = models[0]
    sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    text = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    return sched, vae, text, tok


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    return make_tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


@torch.no_grad()
def text_states(oracles, prompts):
    _, _, text, tok = oracles
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text(ids).last_hidden_state


@torch.no_grad()
def latents(oracles, images):
    vae = oracles[1]
    return vae.encode(torch.stack([to_tensor(im) for im in images])).latent_dist.mean * vae.config.scaling_factor


def class_images(run):
    index = json.loads((run / "class_images" / "index.json").read_text())
    assert index["settings"]["prompts"] == ["a photo of a toy"] * len(index["files"])
    files = [f for p in sorted(index["files"], key=int) for f in index["files"][p]]
    return [Image.open(run / "class_images" / f).convert("RGB") for f in files]


def check_step_inputs(tr, oracles, batch, call, B):
    """x_t of every row from its own x_0, ε and t; the subject's prompt on instance rows, the class prompt on
    class rows. -> (x_0, ᾱ_t) of the rows, from the oracles."""
    x_p, t_p, c_p, _ = call
    i, k, t, eps = batch["i"], batch["k"], batch["t"], batch["eps"]
    assert x_p.shape[0] == 2 * B and torch.equal(t_p, t)
    assert not torch.equal(t[:B], t[B:]) and not torch.equal(eps[:B], eps[B:])  # independent draws
    x0 = torch.cat([latents(oracles, [tr.subject.images[n] for n in i]),
                    latents(oracles, [class_images(tr.out)[n] for n in k])])
    ab = oracles[0].alphas_cumprod[t].view(-1, 1, 1, 1)
    want = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert (x_p - want).abs().max() < 1e-4 * want.abs().max()
    cond = text_states(oracles, ["a photo of sks toy"] * B + ["a photo of a toy"] * B)
    assert (c_p - cond).abs().max() < 1e-4 * cond.abs().max()
    return x0, ab.flatten()


def test_dreambooth_step(models, oracles, tmp_path):
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "dreambooth", "--batch-size", "2",
                      "--num-class-images", "3", "--prior-weight", "0.7")
    assert len(class_images(tr.out)) == 3
    record(tr, "policy_fwd")
    batch = tr.method.draw(torch.Generator().manual_seed(1))
    out = tr.method.loss(batch)
    check_step_inputs(tr, oracles, batch, tr.policy_fwd.calls[0], 2)
    pred, eps = tr.policy_fwd.calls[0][3].detach(), batch["eps"]
    e = ((pred - eps) ** 2).flatten(1).mean(1)
    assert out.loss.item() == pytest.approx(e[:2].mean().item() + 0.7 * e[2:].mean().item(), rel=1e-5)
    assert out.terms["l_prior"].item() == pytest.approx(e[2:].mean().item(), rel=1e-5)


def exact_critic(critic: Critic, channels: int, side: int) -> None:
    """Weights that make Q_φ(r) = mean(r), the look-forward MSE itself (r ≥ 0 passes both activations)."""
    with torch.no_grad():
        for p in critic.parameters():
            p.zero_()
        critic.conv.weight[0, :, 1, 1] = 1 / channels
        critic.fc.weight[0] = 1 / side ** 2
        critic.fc2.weight[0, 0] = 1.0


@pytest.mark.parametrize("reward", ["lookforward", "dino"])
def test_look_forward_step(models, oracles, dino_path, tmp_path, reward):
    """The look-forward step on the tensors the U-Net sees, its loss and the critic's target. With a critic that
    computes its target exactly, the loss must be DreamBooth's with the instance term weighted γ^t(1−ᾱ)/ᾱ
    (look forward), or kept and that term added (dino): an oracle through losses.weighted_mse."""
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "dpg", "--batch-size", "2", "--num-class-images", "3",
                      "--prior-weight", "0.7", "--gamma", "0.999", "--dpg-weight", "1.5", "--dpg-reward", reward,
                      "--dino", str(dino_path))
    m = tr.method
    side = RES // 2
    exact_critic(m.critic, 4, side)
    record(tr, "policy_fwd")
    batch = m.draw(torch.Generator().manual_seed(1))
    out = m.loss(batch)
    x0, ab = check_step_inputs(tr, oracles, batch, tr.policy_fwd.calls[0], 2)
    pred = tr.policy_fwd.calls[0][3]
    eps, t = batch["eps"], batch["t"]
    # the critic's input: r = (x̂_0 − x_0)², x̂_0 from the recorded ε̂ with diffusers' ᾱ
    x_t = tr.policy_fwd.calls[0][0]
    a = ab[:2].view(-1, 1, 1, 1)
    x0_hat = (x_t[:2] - (1 - a).sqrt() * pred[:2].detach()) / a.sqrt()
    r = (x0_hat - x0[:2]) ** 2
    assert torch.allclose(batch["r"], r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    lf = r.flatten(1).mean(1)
    assert out.terms["q"].tolist() == pytest.approx(lf.tolist(), rel=1e-4)
    # the oracle loss, on the same prediction: weighted MSE with per-row weights, over the 4 rows
    w_inst = 1.5 * 0.999 ** t[:2].double() * (1 - ab[:2].double()) / ab[:2].double()
    w = torch.cat([2 * w_inst.float() + (2.0 if reward == "dino" else 0.0), torch.full((2,), 2 * 0.7)])
    oracle = weighted_mse(pred, eps, w)
    assert out.loss.item() == pytest.approx(oracle.item(), rel=1e-4)
    g_ours = torch.autograd.grad(out.loss, pred, retain_graph=True)[0]
    g_oracle = torch.autograd.grad(oracle, pred)[0]
    assert torch.allclose(g_ours, g_oracle, rtol=1e-3, atol=1e-4 * g_oracle.abs().max().item())
    # the critic's target
    cost = m.cost(batch)
    if reward == "lookforward":
        assert cost.tolist() == pytest.approx(lf.tolist(), rel=1e-4)
    else:  # 1 − cos(DINO(decode(x̂_0)), DINO(the step's photo)), DINO and the VAE from the oracles
        with torch.no_grad():
            images = oracles[1].decode(x0_hat / oracles[1].config.scaling_factor).sample.clamp(-1, 1)
            u8 = (((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            pils = [Image.fromarray(a) for a in u8]
            vit = ViTModel.from_pretrained(dino_path, add_pooling_layer=False).eval()
            gen = vit(pixel_values=dino_preprocess(pils, 32)).last_hidden_state[:, 0]
            refs = vit(pixel_values=dino_preprocess([tr.subject.images[n] for n in batch["i"]], 32)).last_hidden_state[:, 0]
        want = 1 - torch.nn.functional.cosine_similarity(gen, refs)
        assert cost.tolist() == pytest.approx(want.tolist(), abs=1e-4)  # a pixel may round the other way
    # after_step: one SGD step of the critic on (r, cost), its gradient norm clipped to --critic-clip, nothing else
    before = {k: v.clone() for k, v in m.critic.state_dict().items()}
    q = m.critic(batch["r"])
    grads = torch.autograd.grad(critic_loss(q, cost), list(m.critic.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    m.after_step(batch, out)
    lr, scale = tr.options.critic_lr, min(1.0, tr.options.critic_clip / (norm + 1e-6))  # 1e-6: as torch clips
    for (name, p), g in zip(m.critic.named_parameters(), grads):
        assert torch.allclose(p, before[name] - lr * scale * g, rtol=1e-5, atol=1e-8), name
    assert out.terms["critic_loss"].item() == pytest.approx(((q - cost) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_critic_step_descends_its_own_loss_alone(models, tmp_path, clip):
    """The critic's step as the loop takes it, after the U-Net's backward, which reached the critic's weights too:
    one SGD step down (Q_φ(r) − cost)² alone — by hand with the critic's initial weights, its gradient norm clipped
    to --critic-clip (0: unclipped, the authors') — so the critic's loss on that step's (r, cost) goes down."""
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "dpg", "--batch-size", "2", "--num-class-images", "3",
                      "--critic-lr", "1e-3")
    m = tr.method
    m.opt.critic_clip = clip
    params = dict(m.critic.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    batch = m.draw(torch.Generator().manual_seed(1))
    out = m.loss(batch)
    out.loss.backward()  # the loop's backward, before after_step
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())  # the U-Net's loss did
    # by hand, on a copy of the critic's weights: the critic's loss and its gradient
    r, cost = batch["r"], batch["lookforward"]  # both checked against the oracles in test_look_forward_step
    w = {k: v.clone().requires_grad_(True) for k, v in before.items()}

    def q_of(w):
        h = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(r, w["conv.weight"], w["conv.bias"], padding=1),
                                           0.01)
        h = torch.relu(h.flatten(1) @ w["fc.weight"].T + w["fc.bias"])
        return (h @ w["fc2.weight"].T + w["fc2.bias"]).squeeze(1)

    loss_before = ((q_of(w) - cost) ** 2).mean()
    g = dict(zip(w, torch.autograd.grad(loss_before, list(w.values()))))
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())).item()
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    assert clip == 0 or scale < 0.5  # the clip really acts here
    m.after_step(batch, out)
    lr = 1e-3
    for k, p in params.items():
        step, want = p.detach() - before[k], -lr * scale * g[k]
        assert torch.allclose(step, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()), k
        assert p.grad is None  # nothing left for the next step
    with torch.no_grad():
        loss_after = ((q_of({k: v.detach() for k, v in params.items()}) - cost) ** 2).mean()
    assert loss_after < loss_before.detach()
    assert out.terms["critic_loss"].item() == pytest.approx(loss_before.item(), rel=1e-5)
    assert out.terms["critic_grad_norm"].item() == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("method", ["dreambooth", "dpg"])
def test_bf16_loss_is_close_to_fp32(models, tmp_path, method):
    """Under bf16 autocast the step's loss is finite and within bf16's error of the fp32 one."""
    subject = make_subject(tmp_path / "subject", n=3)
    losses = []
    for precision in ("fp32", "bf16"):
        tr = make_trainer(models, subject, tmp_path / precision, method, "--num-class-images", "2",
                          "--precision", precision)
        batch = tr.method.draw(torch.Generator().manual_seed(3))
        losses.append(tr.method.loss(batch).loss.item())
    assert np.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=5e-2)
