"""What one training step really feeds the U-Nets, and what validation really scores.

The step is checked on the tensors the trainer passes to the policy and reference U-Nets (recorded by
wrapping the real networks), against oracles computed here independently: diffusers' noise schedule and
VAE, transformers' CLIP text model, all read from the same tiny checkpoint files.
"""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from tests.test_methods import record
from tests.test_train import RES, base_args, make_subject, models  # noqa: F401  (models is a fixture)
from tinyrpo.config import TrainConfig
from tinyrpo.data import to_tensor
from tinyrpo.evaluation.grids import grid_cells
from tinyrpo.reward import score
from tinyrpo.trainer import Trainer

import train


class Recorder:
    """Calls the real network and keeps its inputs and output."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t, c):
        out = self.net(x, t, c)
        self.calls.append((x.detach().clone(), t.clone(), c.detach().clone(), out.detach().clone()))
        return out


def make_trainer(models, subject, out, *extra) -> Trainer:
    args, given = train.parse_args(base_args(models, subject, out, "--steps", "2", *extra))
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


@torch.no_grad()
def text_states(oracles, prompts):
    _, _, text, tok = oracles
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text(ids).last_hidden_state


@torch.no_grad()
def latents(oracles, image: Image.Image):
    vae = oracles[1]
    return vae.encode(to_tensor(image)[None]).latent_dist.mean * vae.config.scaling_factor


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_pair_inputs(models, oracles, tmp_path, noise):
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "--noise", noise, "--batch-size", "2")
    record(tr, "policy_fwd", "ref_fwd", recorder=Recorder)
    batch = tr.method.draw(torch.Generator().manual_seed(5))
    out = tr.method.loss(batch)
    (x_p, t_p, c_p, pred), (x_r, t_r, c_r, ref_pred) = tr.policy_fwd.calls[0], tr.ref_fwd.calls[0]
    # the policy and the frozen reference see the very same inputs
    assert torch.equal(x_p, x_r) and torch.equal(t_p, t_r) and torch.equal(c_p, c_r)
    B = 2
    i, j, t, eps = batch["i"], batch["j"], batch["t"], batch["eps"]
    assert x_p.shape[0] == 2 * B and torch.equal(t_p, t)
    if noise == "shared":  # a pair shares ε and t (Diffusion-DPO)
        assert torch.equal(t[:B], t[B:]) and torch.equal(eps[:B], eps[B:])
    else:
        assert not torch.equal(eps[:B], eps[B:])
    # x_0: winners are the reference photos, losers the saved negative-set images, through diffusers' VAE
    index = json.loads((tr.out / "negatives" / "index.json").read_text())
    files = [f for p in sorted(index["files"], key=int) for f in index["files"][p]]
    prompts = json.loads((tr.out / "config.json").read_text())["train_prompts"]
    negatives = [Image.open(tr.out / "negatives" / f).convert("RGB") for f in files]
    x0 = torch.cat([latents(oracles, tr.subject.images[k]) for k in i] +
                   [latents(oracles, negatives[k]) for k in j])
    # x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with diffusers' ᾱ
    ab = oracles[0].alphas_cumprod[t].view(-1, 1, 1, 1)
    expect = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert (x_p - expect).abs().max() < 1e-4 * expect.abs().max()
    # conditioning: the reference prompt for w, the loser's own training prompt for l
    want = text_states(oracles, [tr.subject.reference_prompt] * B + [prompts[int(files[k][:3])] for k in j])
    assert (c_p - want).abs().max() < 1e-4 * want.abs().max()
    assert len({int(files[k][:3]) for k in range(len(files))}) == len(prompts)
    # the loss terms are those of the recorded predictions
    e_w = ((pred[:B] - eps[:B]) ** 2).flatten(1).mean(1)
    e_l = ((pred[B:] - eps[B:]) ** 2).flatten(1).mean(1)
    r_w = ((ref_pred[:B] - eps[:B]) ** 2).flatten(1).mean(1)
    r_l = ((ref_pred[B:] - eps[B:]) ** 2).flatten(1).mean(1)
    assert out.terms["l_sim"].item() == pytest.approx(e_w.mean().item(), rel=1e-5)
    assert out.terms["delta"].tolist() == pytest.approx(((r_w - e_w) - (r_l - e_l)).tolist(), rel=1e-4, abs=1e-7)


def test_labels_follow_the_rewards(models, tmp_path):
    """y ~ Bernoulli(σ(h(w) − h(l))) with the pair's own rewards; 'pair' scores w against the loser's prompt."""
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "--winner-prompt", "pair")
    m = tr.method
    assert m.h_w.shape == (3, len(tr.prompts))
    # Rig the rewards so that the label tells which winner reward was used: w wins for prompt 0 only.
    m.h_w = torch.full_like(m.h_w, -50.0)
    m.h_w[:, 0] = 50.0
    m.h_l = torch.zeros_like(m.h_l)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = m.draw(g)
        assert b["y"].tolist() == [float(m.l_prompt[j] == 0) for j in b["j"]]


def test_validation_scores_the_policy(models, tmp_path):
    """Validation generates with the weights being trained (not the frozen base) and scores those images."""
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run")
    v0 = tr.validate(0)
    grid0 = np.asarray(Image.open(tr.out / "val" / "step_00000.png"))
    with torch.no_grad():  # perturb the frozen reference: validation must not change
        for p in tr.ref_fwd.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert np.array_equal(np.asarray(tr.validate(1) and Image.open(tr.out / "val" / "step_00001.png")), grid0)
    with torch.no_grad():  # perturb the policy: validation must change
        for p in tr.policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    v2 = tr.validate(2)
    grid2 = Image.open(tr.out / "val" / "step_00002.png").convert("RGB")
    assert not np.array_equal(np.asarray(grid2), grid0)
    # the recorded reward is the fp32 reward of exactly the images in the grid
    n = tr.cfg.val_images_per_prompt
    cells = grid_cells(grid2, len(tr.prompts), n, (RES, RES))
    s = tr.reward(cells, [p for p in tr.prompts for _ in range(n)], tr.cfg.lambda_val)
    assert v2["reward"] == pytest.approx(s.reward.mean().item(), rel=1e-6)
    assert v2["reward"] != pytest.approx(v0["reward"], rel=1e-6)


def test_validation_reward_is_fp32_under_bf16(models, tmp_path):
    """With bf16 autocast the images are made in bf16, but the reward is scored in fp32 outside autocast."""
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "--precision", "bf16")
    v = tr.validate(0)
    grid = Image.open(tr.out / "val" / "step_00000.png").convert("RGB")
    n = tr.cfg.val_images_per_prompt
    cells = grid_cells(grid, len(tr.prompts), n, (RES, RES))
    s = score(tr.scorer, cells, [p for p in tr.prompts for _ in range(n)], tr.ref_embs, "sks", tr.cfg.lambda_val)
    assert v["reward"] == pytest.approx(s.reward.mean().item(), rel=1e-6)


def test_pair_winner_is_scored_against_the_pairs_training_prompt(models, tmp_path, monkeypatch):
    """--winner-prompt pair: the h(w) a label is drawn with is the reference image's reward for the training prompt
    of the loser it is paired with (not for the reference prompt), read off the values the label sampler gets."""
    from tinyrpo import rpo
    subject = make_subject(tmp_path / "subject", n=3)
    tr = make_trainer(models, subject, tmp_path / "run", "--winner-prompt", "pair")
    m, refs = tr.method, tr.subject.images
    with torch.no_grad():  # the oracle: each reference image scored against each prompt, here
        by_prompt = {p: tr.reward(refs, [p] * len(refs), 0.0).reward.cpu()
                     for p in [tr.subject.reference_prompt, *tr.prompts]}
    assert not torch.allclose(by_prompt[tr.prompts[0]], by_prompt[tr.subject.reference_prompt])  # the test can tell
    seen = []
    real = rpo.sample_label
    monkeypatch.setattr(rpo, "sample_label", lambda h_w, h_l, generator=None, **kw: (
        seen.append(h_w.clone()), real(h_w, h_l, generator, **kw))[1])
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        b = m.draw(g)
        want = torch.stack([by_prompt[tr.prompts[m.l_prompt[j]]][i] for i, j in zip(b["i"], b["j"])])
        assert torch.allclose(seen[-1], want, atol=1e-6, rtol=0)
    rewards = json.loads((tr.out / "rewards.json").read_text())
    assert torch.allclose(torch.tensor(rewards["reference"]), torch.stack([by_prompt[p] for p in tr.prompts], 1),
                          atol=1e-6, rtol=0)
