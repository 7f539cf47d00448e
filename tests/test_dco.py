"""DCO (Lee et al. 2024): the loss on hand-computed numbers, its value and gradient at init, what the policy and
the frozen base model see in a step, and train.py end to end with LoRA and without, resumed exactly.

Oracles are independent of the code under test: numbers worked out by hand (log σ written as log(1/(1+exp))),
diffusers' noise schedule, VAE and U-Net, transformers' CLIP text model, all reading the same tiny checkpoint.
"""
import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

import train
from tests.test_methods import latents, record, make_trainer, method_args, oracles, text_states  # noqa: F401
from tests.test_methods_train import records
from tests.test_train import make_subject, models  # noqa: F401  (models and oracles are fixtures)
from tinyrpo.formats.checkpoint import load_checkpoint
from tinyrpo.dco import DCO, dco_loss, dco_objective
from tinyrpo.errors import UserError
from tinyrpo.methods import METHODS


def log_sigmoid(x: float) -> float:
    """log σ(x) the long way round, not through torch: log(1 / (1 + exp(−x)))."""
    return math.log(1.0 / (1.0 + math.exp(-x)))


# ------------------------------------------------------------------------------------ the loss

def test_dco_loss_by_hand():
    e_theta = torch.tensor([0.30, 0.10, 0.25, 0.50], dtype=torch.float64)
    e_ref = torch.tensor([0.20, 0.10, 0.30, 0.10], dtype=torch.float64)
    got = dco_loss(e_theta, e_ref, beta=10.0)
    # β(e_θ − e_ref) = 1, 0, −0.5, 4: the loss −log σ(−β(e_θ − e_ref)) = log(1 + exp(β(e_θ − e_ref)))
    assert got.tolist() == pytest.approx([1.3132616875182228, math.log(2), 0.47407698418010663, 4.0181499279178094],
                                         rel=1e-12)
    assert got.tolist() == pytest.approx([-log_sigmoid(-x) for x in (1.0, 0.0, -0.5, 4.0)], rel=1e-12)
    # the policy doing better than the base model lowers the loss, worse raises it: not symmetric in the two
    assert dco_loss(torch.tensor([0.2]), torch.tensor([0.3]), 10.0).item() < math.log(2) < \
        dco_loss(torch.tensor([0.3]), torch.tensor([0.2]), 10.0).item()
    # a larger β: the same error gap, a sharper loss (β = 1000 at a gap of 0.01 is 10 in the sigmoid)
    assert dco_loss(torch.tensor([0.31]), torch.tensor([0.30]), 1000.0).item() == pytest.approx(
        -log_sigmoid(-10.0), rel=1e-5)


def test_dco_objective_from_predictions():
    """Per-row errors are the mean over the latent's elements of (pred − ε)²: with pred = ε + a everywhere, e = a²."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 4, 5, 5, generator=g)
    a = torch.tensor([0.5, 0.2, 0.3]).view(-1, 1, 1, 1)  # policy errors 0.25, 0.04, 0.09
    b = torch.tensor([0.4, 0.3, 0.3]).view(-1, 1, 1, 1)  # base errors 0.16, 0.09, 0.09
    pred = (eps + a).requires_grad_(True)
    out = dco_objective(pred, eps + b, eps, beta=20.0)
    x = [20 * (0.25 - 0.16), 20 * (0.04 - 0.09), 0.0]  # 1.8, −1, 0
    assert out.loss.item() == pytest.approx(sum(-log_sigmoid(-v) for v in x) / 3, rel=1e-5)
    assert out.e_theta.tolist() == pytest.approx([0.25, 0.04, 0.09], rel=1e-5)
    assert out.e_ref.tolist() == pytest.approx([0.16, 0.09, 0.09], rel=1e-5)
    # d/dpred: (1/B) · σ(β(e_θ − e_ref)) · β · 2(pred − ε)/D, with D = 100 elements a row
    out.loss.backward()
    want = [1 / 3 * (1 / (1 + math.exp(-v))) * 20 * 2 * float(a[n]) / 100 for n, v in enumerate(x)]
    assert torch.allclose(pred.grad, torch.tensor(want).view(-1, 1, 1, 1).expand_as(pred), rtol=1e-5)


# ------------------------------------------------------------------------------------ a step, through the trainer

@pytest.fixture(scope="module")
def base_unet(models):
    return UNet2DConditionModel.from_pretrained(models[0], subfolder="unet").eval()


def dco_trainer(models, tmp_path, *extra):
    subject = make_subject(tmp_path / "subject", n=3)
    return make_trainer(models, subject, tmp_path / "run", "dco", "--batch-size", "3", *extra)


@pytest.mark.parametrize("lora", [False, True])
def test_at_init_the_loss_is_log2_and_the_gradient_beta_half_the_mse(models, tmp_path, lora):
    """Policy = base model (a fresh full fine-tune, or LoRA adapters with B = 0): e_θ = e_ref, so the loss is log 2
    and its gradient is σ(0)·β = β/2 times that of the plain denoising loss mean(e_θ), parameter by parameter."""
    tr = dco_trainer(models, tmp_path, "--dco-beta", "40", *(["--lora", "2"] if lora else []))
    batch = tr.method.draw(torch.Generator().manual_seed(1))
    out = tr.method.loss(batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(out.terms["e_theta"], out.terms["e_ref"])
    params = [p for p in tr.params if p.requires_grad]
    g_dco = torch.autograd.grad(out.loss, params, allow_unused=True)
    x_t, t, cond, eps = tr.method.inputs(batch)
    mse = ((tr.policy_fwd(x_t, t, cond) - eps) ** 2).flatten(1).mean(1).mean()  # the plain loss, by hand
    g_mse = torch.autograd.grad(mse, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(g_dco, g_mse) if b is not None]
    assert pairs and sum(b.abs().sum().item() for _, b in pairs) > 0
    a, b = torch.cat([a.flatten() for a, _ in pairs]), torch.cat([b.flatten() for _, b in pairs])
    # float32 sums in a different order: agreement to 1e-4 of the largest gradient entry, over every parameter
    assert (a - 20.0 * b).abs().max() <= 1e-4 * 20.0 * b.abs().max()


@pytest.mark.parametrize("lora", [False, True])
def test_step_inputs_and_the_reference_is_the_frozen_base(models, oracles, base_unet, tmp_path, lora):  # noqa: F811
    """With the policy moved away from the base, a step: x_t of each drawn photo from its own ε and t; the subject's
    prompt; the reference called on the very same x_t, t and text, and equal to diffusers' base U-Net; the loss by
    hand from the two predictions and ε (not x_0, not the other model's prediction)."""
    tr = dco_trainer(models, tmp_path, "--dco-beta", "1000", *(["--lora", "2"] if lora else []))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the policy: every trained weight (with LoRA: the adapters, B = 0 at init)
        for p in tr.params:
            p.add_((0.3 if lora else 0.02) * torch.randn(p.shape, generator=g))
    record(tr, "policy_fwd", "ref_fwd")
    batch = tr.method.draw(torch.Generator().manual_seed(2))
    out = tr.method.loss(batch)
    (x_p, t_p, c_p, pred), (x_r, t_r, c_r, ref) = tr.policy_fwd.calls[0], tr.ref_fwd.calls[0]
    i, t, eps = batch["i"], batch["t"], batch["eps"]
    assert len(set(i.tolist())) > 1 and len(set(t.tolist())) > 1
    # x_t = √ᾱ x_0 + √(1−ᾱ) ε with diffusers' ᾱ and VAE; the subject's prompt through transformers' CLIP
    x0 = latents(oracles, [tr.subject.images[n] for n in i])
    ab = oracles[0].alphas_cumprod[t].view(-1, 1, 1, 1)
    want = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert (x_p - want).abs().max() < 1e-4 * want.abs().max()
    cond = text_states(oracles, ["a photo of sks toy"] * 3)
    assert (c_p - cond).abs().max() < 1e-4 * cond.abs().max()
    # the reference sees exactly what the policy sees
    assert torch.equal(x_r, x_p) and torch.equal(t_r, t_p) and torch.equal(c_r, c_p)
    # ... and is the base model, not the moved policy
    with torch.no_grad():
        base = base_unet(x_p, t_p, encoder_hidden_states=c_p).sample
    assert (ref - base).abs().max() < 1e-4 * base.abs().max()
    assert (pred.detach() - base).abs().max() > 2e-2 * base.abs().max()  # 200 times the tolerance above
    assert not ref.requires_grad and pred.requires_grad
    # the loss, by hand from the two predictions and the noise ε
    e_theta = ((pred.detach().double() - eps.double()) ** 2).flatten(1).mean(1)
    e_ref = ((ref.double() - eps.double()) ** 2).flatten(1).mean(1)
    want_loss = sum(-log_sigmoid(-1000 * float(d)) for d in e_theta - e_ref) / 3
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert out.terms["e_theta"].tolist() == pytest.approx(e_theta.tolist(), rel=1e-5)
    assert out.terms["e_ref"].tolist() == pytest.approx(e_ref.tolist(), rel=1e-5)


# ------------------------------------------------------------------------------------ train.py end to end

@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("dco")
    prompts = d / "prompts.txt"
    prompts.write_text("a [V] {cls} on the beach\n")  # one training prompt: validation makes one image
    return make_subject(d / "subject"), prompts


def dco_args(models, setup, out, *extra):
    subject, prompts = setup
    return method_args(models, subject, out, "dco", "--val-every", "2", *extra, prompts=prompts)


@pytest.mark.parametrize("lora", [False, True])
def test_dco_end_to_end_and_exact_resume(models, setup, tmp_path, lora):
    from tinyrpo.formats.weights import load_sd
    extra = ["--lora", "2"] if lora else []
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(dco_args(models, setup, full, "--steps", "4", *extra)) == 0
    cfg = json.loads((full / "config.json").read_text())
    assert (cfg["method"], cfg["dco_beta"], cfg["select"], cfg["train_text_encoder"]) == ("dco", 1000.0, "last", False)
    assert cfg["lr"] == 1e-3  # given: the method's default is only a default
    steps = [r for r in records(full) if not r.get("val")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "e_theta", "e_ref", "t"} <= r.keys() for r in steps)
    # step 1 starts from the base model (β = 1000 turns float32 noise of 1e-7 in the errors into 1e-4 here)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert steps[-1]["loss"] < math.log(2)  # and then learns to denoise the photos better than it
    for r in steps:
        want = sum(-log_sigmoid(-1000 * (a - b)) for a, b in zip(r["e_theta"], r["e_ref"])) / len(r["e_theta"])
        assert r["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    state, meta = load_checkpoint(full / "best.safetensors")
    assert meta["step"] == 4 and meta["method"] == "dco"
    if lora:
        assert meta["content"] == "lora" and state and all(".lora_" in k for k in state)
    else:  # every U-Net weight, moved from the base
        base = load_sd(models[0]).unet.state_dict()
        assert state.keys() == base.keys() and any(not torch.equal(v, base[k]) for k, v in state.items())
    last = torch.load(full / "last.pt", weights_only=True)
    # interrupted after step 2, resumed to 4: the same weights and log, bit for bit
    assert train.main(dco_args(models, setup, part, "--steps", "2", *extra)) == 0
    assert train.main(dco_args(models, setup, part, "--steps", "4", "--resume", *extra)) == 0
    resumed = torch.load(part / "last.pt", weights_only=True)
    assert last["unet"].keys() == resumed["unet"].keys()
    assert all(torch.equal(v, resumed["unet"][k]) for k, v in last["unet"].items())
    assert records(full) == records(part)


def test_dco_defaults_help_and_errors(models, setup, tmp_path):
    assert METHODS["dco"] is DCO and DCO.uses_reference
    o = DCO.Options()
    assert o.dco_beta == 1000.0  # the authors' --dcoloss_beta
    assert DCO.defaults == {"lr": 5e-6, "lora_lr": 5e-5, "steps": 2000, "select": "last", "train_text_encoder": False}
    text = " ".join(train.build_parser().format_help().split())
    assert "--dco-beta" in text and "(default: 1000.0, the authors')" in text
    assert "dco 5e-5" in text  # the LoRA learning rate
    # with --lora and no --lr: the authors' 5e-5 (other methods keep LORA_LR)
    from tinyrpo.config import LORA_LR, TrainConfig, resolve_config
    for method, lr in (("dco", 5e-5), ("rpo", LORA_LR)):
        args, given = train.parse_args(["--subject", str(setup[0]), "--method", method, "--lora", "4"])
        assert resolve_config(TrainConfig.from_args(args), given).lr == lr
    # mistakes: one line, nothing written
    out = tmp_path / "run"
    for flags, match in ((["--dco-beta", "0"], "--dco-beta must be positive"),
                         (["--dco-beta", "nan"], "--dco-beta must be a finite number"),
                         (["--beta", "2"], "--beta is not a setting of --method dco")):
        with pytest.raises(UserError, match=match):
            train.main(dco_args(models, setup, out, "--steps", "2", *flags))
        assert not out.exists()
    with pytest.raises(UserError, match="--dco-beta is not a setting of --method rpo"):
        train.main(method_args(models, setup[0], out, "rpo", "--dco-beta", "10"))
    assert not out.exists()


def test_compare_takes_dco():
    """tinyrpo.compare accepts --methods …,dco and gives each cell its own options."""
    from tinyrpo import compare
    from tinyrpo.evaluation import comparison
    assert "dco" in compare.build_parser().format_help()
    args = ["--lr", "1e-4", "--beta", "2", "--dco-beta", "500", "--num-class-images=3", "--steps", "5"]
    assert comparison.method_args(args, "dco") == ["--lr", "1e-4", "--dco-beta", "500", "--steps", "5"]
    assert comparison.method_args(args, "rpo") == ["--lr", "1e-4", "--beta", "2", "--steps", "5"]
    comparison.check_method_options(args, ["rpo", "dreambooth", "dco"])  # every flag belongs to one of them
    with pytest.raises(UserError, match="--dco-beta is not a setting of rpo or dreambooth"):
        comparison.check_method_options(["--dco-beta", "500"], ["rpo", "dreambooth"])
    cells = comparison.plan(["rpo", "dco"], [comparison.Path("refs/toy")], [0])
    assert [c.label() for c in cells] == ["rpo/toy/seed0", "dco/toy/seed0"]
