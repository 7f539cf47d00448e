"""tinyrpo.lora: eq. (3) against hand-built weights and PEFT, switching off, merging, training under gradient
checkpointing, autocast and torch.compile. Tiny random U-Nets on the CPU."""
import copy

import pytest
import torch
import torch.nn as nn

from tests.fixtures import TINY_UNET
from tests.util import max_rel_err, randomize_
from tinyrpo.errors import UserError
from tinyrpo.lora import (DEFAULT_TARGETS, LoRALinear, add_lora, load_lora_state_dict, lora_config, lora_disabled,
                          lora_layers, lora_state_dict, merge_lora, set_lora_scale)
from tinyrpo.unet import Transformer2DModel, UNet

RANK = 4


def tiny_unet(seed=0) -> UNet:
    return randomize_(UNet(TINY_UNET), seed=seed).eval()


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700])[:batch],
            torch.randn(batch, 77, TINY_UNET.cross_attention_dim, generator=g))


def known_factors(layer: LoRALinear, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (d × r) and A (r × k) drawn large enough that B A moves the output well past float noise."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layer.out_features, layer.rank, generator=g) * 0.2,
            torch.randn(layer.rank, layer.in_features, generator=g) * 0.2)


def set_known(model, seed=1) -> dict[str, torch.Tensor]:
    """Give every adapter known factors; return module path -> B A."""
    products = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(lora_layers(model).items()):
            B, A = known_factors(layer, seed + i)
            layer.lora_B.weight.copy_(B)
            layer.lora_A.weight.copy_(A)
            products[name] = B @ A
    return products


@torch.no_grad()
def with_update(model, products: dict, factor: float):
    """The oracle: a plain copy of the base model with W0 + factor · (B A) written into its weights by hand."""
    out = copy.deepcopy(model)
    for name, BA in products.items():
        out.get_submodule(name).weight += factor * BA
    return out


# ---------------------------------------------------------------------------------------------------------
# eq. (3)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [None, 2.0], ids=["alpha=rank", "alpha=2"])
def test_lora_equals_the_full_update(alpha):
    """h = W0 x + (α/r)·B A x: with B A set to known matrices the adapted U-Net equals the base U-Net whose
    weights were changed by (α/r)·B A by hand; set_lora_scale multiplies the update."""
    base = tiny_unet()
    x, t, c = inputs()
    model = copy.deepcopy(base)
    add_lora(model, RANK, alpha)
    assert torch.equal(model(x, t, c), base(x, t, c))  # B = 0 at the start: the base model exactly
    products = set_known(model)
    assert len(products) == 48  # see test_default_targets_are_every_attention_projection
    factor = (alpha or RANK) / RANK
    want = with_update(base, products, factor)(x, t, c)
    got = model(x, t, c)
    assert max_rel_err(got, want) <= 1e-5
    assert max_rel_err(got, base(x, t, c)) > 1e-2  # the update matters
    set_lora_scale(model, 0.5)
    assert max_rel_err(model(x, t, c), with_update(base, products, 0.5 * factor)(x, t, c)) <= 1e-5


def test_default_targets_are_every_attention_projection():
    model = tiny_unet()
    add_lora(model, RANK)
    # TINY_UNET attends on level 0 only: 2 down + 3 up transformers, plus the mid block's: 6 x 2 attentions x 4
    want = sorted(n for n, m in tiny_unet().named_modules()
                  if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"))
    assert sorted(lora_layers(model)) == want and len(want) == 6 * 2 * 4
    layer = model.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert layer.lora_A.weight.shape == (RANK, TINY_UNET.cross_attention_dim)  # cross-attention reads the text
    assert layer.lora_B.weight.shape == (64, RANK)


@torch.no_grad()
def test_matches_peft_on_diffusers_unet(tmp_path):
    """PEFT's LoRA on diffusers' U-Net, holding the same base weights and the same A and B, is the oracle for the
    formula, the scaling α/r and the names (ours are PEFT's minus its adapter name)."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from tests.fixtures import unet_config_json
    base = tiny_unet()
    theirs = diffusers.UNet2DConditionModel.from_config(unet_config_json(TINY_UNET)).eval()
    theirs.load_state_dict(base.state_dict())
    theirs.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=6.0, target_modules=list(DEFAULT_TARGETS)))
    model = copy.deepcopy(base)
    add_lora(model, RANK, alpha=6.0)
    set_known(model)
    params = dict(theirs.named_parameters())
    ours = lora_state_dict(model)
    for k, v in ours.items():
        params[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")].copy_(v)
    assert len([k for k in params if ".lora_" in k]) == len(ours)
    x, t, c = inputs()
    assert max_rel_err(model(x, t, c), theirs(x, t, encoder_hidden_states=c).sample) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Switching off, merging, saving


@torch.no_grad()
def test_disabled_is_the_base_model_and_merge_is_the_adapted_one():
    base = tiny_unet()
    x, t, c = inputs()
    model = copy.deepcopy(base)
    add_lora(model, RANK, alpha=8.0)
    set_known(model)
    adapted = model(x, t, c)
    with lora_disabled(model):
        assert torch.equal(model(x, t, c), base(x, t, c))
    assert torch.equal(model(x, t, c), adapted)  # back on after the block

    set_lora_scale(model, 0.7)
    scaled = model(x, t, c)
    merge_lora(model)
    assert not lora_layers(model) and all(type(m) is nn.Linear for n, m in model.named_modules()
                                          if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    assert max_rel_err(model(x, t, c), scaled) <= 1e-5
    assert model.state_dict().keys() == base.state_dict().keys()


def test_state_dict_round_trip_and_strict_load():
    model = tiny_unet()
    add_lora(model, RANK)
    set_known(model, seed=5)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state) and len(state) == 2 * 48
    cfg = lora_config(model)
    other = tiny_unet()
    add_lora(other, **cfg)
    load_lora_state_dict(other, state)
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(other(x, t, c), model(x, t, c))
    # the base weights keep their names next to the adapters'
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in model.state_dict()

    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(UserError, match="missing"):
        load_lora_state_dict(other, bad)
    wrong_rank = tiny_unet()
    add_lora(wrong_rank, RANK * 2)
    with pytest.raises(UserError, match="mis-shaped"):
        load_lora_state_dict(wrong_rank, state)


@pytest.mark.parametrize("targets, match", [
    (("proj_in",), "not nn.Linear"),
    (("to_qq",), "no layer of the U-Net is named to_qq"),
])
def test_bad_targets(targets, match):
    with pytest.raises(UserError, match=match):
        add_lora(tiny_unet(), RANK, targets=targets)
    with pytest.raises(UserError, match="rank must be at least 1"):
        add_lora(tiny_unet(), 0)


def test_other_targets():
    model = tiny_unet()
    add_lora(model, 2, targets=("attn2.to_k", "ff.net.2"))
    assert sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in lora_layers(model)}) == [
        "attn2.to_k", "net.2"]
    assert len(lora_layers(model)) == 6 * 2


# ---------------------------------------------------------------------------------------------------------
# Training: gradients, gradient checkpointing, autocast, torch.compile


def grads_of_a_step(checkpointing: bool):
    model = tiny_unet()
    params = add_lora(model, RANK)
    set_known(model)
    model.gradient_checkpointing = checkpointing
    model.train()
    x, t, c = inputs()
    pred = model(x, t, c)
    with torch.no_grad(), lora_disabled(model):  # RPO's reference forward between the forward and backward
        ref = model(x, t, c)
    ((pred - ref) ** 2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)  # W0 frozen
    return [p.grad.clone() for p in params]


def test_gradients_with_and_without_checkpointing():
    plain, ckpt = grads_of_a_step(False), grads_of_a_step(True)
    assert all(g.abs().max() > 0 for g in plain)
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(ckpt, plain))


def test_zero_b_gives_gradient_to_b_only():
    """At initialisation B = 0, so ∂h/∂A = 0 (A's output is multiplied by B) and only B moves first."""
    model = tiny_unet()
    params = add_lora(model, RANK)
    model.train()
    x, t, c = inputs()
    model(x, t, c).square().mean().backward()
    assert all(p.grad.abs().max() == 0 for p in params[0::2])  # A
    assert all(p.grad.abs().max() > 0 for p in params[1::2])  # B


def transformer_with_lora():
    block = randomize_(Transformer2DModel(32, 8, 16, 8), seed=3)
    base = copy.deepcopy(block)
    add_lora(block, RANK, alpha=8.0)
    set_known(block)
    g = torch.Generator().manual_seed(0)
    return block, base, torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 7, 16, generator=g)


def test_autocast_bf16():
    block, base, x, ctx = transformer_with_lora()
    with torch.no_grad():
        want, off = block(x, ctx), base(x, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block(x, ctx)
            with lora_disabled(block):
                got_off = block(x, ctx)
    assert max_rel_err(got, want) <= 3e-2 and max_rel_err(got_off, off) <= 3e-2  # bf16 rounding only
    assert max_rel_err(got, off) > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, ctx).float().square().mean().backward()
    assert block.transformer_blocks[0].attn1.to_q.lora_B.weight.grad.dtype == torch.float32  # fp32 masters
    # a half-precision base without autocast: the adapter still runs (in fp32) and the output keeps bf16
    half = copy.deepcopy(block).to(torch.bfloat16)
    for layer in lora_layers(half).values():
        layer.lora_A.float(), layer.lora_B.float()
    with torch.no_grad():
        out = half(x.bfloat16(), ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and max_rel_err(out, want) <= 3e-2


def test_torch_compile():
    """One compiled module serves both the adapted model and, under lora_disabled, the base model."""
    block, base, x, ctx = transformer_with_lora()
    compiled = torch.compile(block, backend="aot_eager")
    with torch.no_grad():
        want, off = block(x, ctx), base(x, ctx)
    got = compiled(x, ctx)
    with torch.no_grad(), lora_disabled(block):
        got_off = compiled(x, ctx)
    assert max_rel_err(got, want) <= 1e-5 and max_rel_err(got_off, off) <= 1e-5
    got.square().mean().backward()
    eager = copy.deepcopy(block)
    eager.zero_grad()
    eager(x, ctx).square().mean().backward()
    a = block.transformer_blocks[0].attn2.to_v.lora_A.weight.grad
    assert max_rel_err(a, eager.transformer_blocks[0].attn2.to_v.lora_A.weight.grad) <= 1e-5
