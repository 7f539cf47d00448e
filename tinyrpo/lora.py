"""LoRA: low-rank adapters on the U-Net's linear layers (Hu et al. 2021, arXiv 2106.09685).

A frozen pretrained weight W0 (d × k) is adapted by a product of two small matrices:

    h = W0 x + (α / r) · B A x        eq. (3), with the scaling of sec. 4.1
        A: r × k, initialised randomly; B: d × r, initialised to zero, so training starts at h = W0 x

Only A and B train: r·(d + k) numbers per layer instead of d·k, so the optimizer state and the checkpoint
shrink from gigabytes to megabytes. (α/r keeps the step size of B A roughly independent of r: "tuning α is
roughly the same as tuning the learning rate".) The base U-Net with the adapters switched off is the
pretrained model itself, which is what RPO's frozen reference needs: no second copy of the U-Net.

    params = add_lora(unet, rank=4)              # wrap, freeze W0, return the A and B parameters to train
    with lora_disabled(unet):                    # the base model, e.g. RPO's reference prediction
        ref = unet(x, t, c)
    set_lora_scale(unet, 0.8)                    # sampling strength, like A1111's <lora:name:0.8>
    lora_state_dict(unet) / load_lora_state_dict(unet, state)      # the A and B tensors only
    merge_lora(unet)                             # W0 += scale·(α/r)·B A; plain nn.Linear layers again

Names follow PEFT's (`...attn1.to_q.lora_A.weight`), and a wrapped layer keeps its own `weight` / `bias`
names, so the rest of the U-Net's state dict is unchanged. A is initialised as in microsoft/loralib, PEFT
and kohya's sd-scripts (Kaiming-uniform, like nn.Linear's own weight); the paper says "random Gaussian",
which differs only in the distribution of the same small scale.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyrpo.errors import UserError

# The attention projections of every transformer block, self- and cross-attention: what diffusers'
# train_dreambooth_lora.py and most SD LoRAs adapt.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = W0 x + b + scale · (α/r) · B (A x)  (eq. 3).

    Takes over the base layer's weight and bias (the same Parameters, frozen), so its state-dict names stay
    `weight` / `bias`; the adapter adds `lora_A.weight` (r × k) and `lora_B.weight` (d × r), kept in fp32:
    they are the trained master weights, whatever dtype the base is stored in.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the wrapped model starts as the base model
        self.rank, self.alpha = rank, float(alpha)
        self.scale = 1.0  # a multiplier at sampling time (--lora-scale); 1 while training
        self.enabled = True  # False: the base layer alone (see lora_disabled)

    @property
    def scaling(self) -> float:
        return self.scale * self.alpha / self.rank

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a = self.lora_A.weight
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)  # a half-precision base without autocast: the adapter still runs in fp32
        return y + (self.lora_B(self.lora_A(x)) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · (α/r) · B A, in fp32: what merging adds to W0."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, targets) -> bool:
    """A module path matches a target when it equals it or ends with "." + target (e.g. attn2.to_k)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, in the model's order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets=DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Wrap every nn.Linear whose path matches `targets` in a LoRALinear; freeze everything else.

    alpha None means alpha = rank (scaling 1, as diffusers' LoRA scripts do). Returns the trainable
    parameters (A and B of each layer, in module order) for the optimizer.
    """
    if rank < 1:
        raise UserError(f"--lora rank must be at least 1 (got {rank})")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise UserError(f"--lora-alpha must be positive (got {alpha:g})")
    if lora_layers(model):
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    targets = tuple(targets)
    found = [(name, m) for name, m in model.named_modules() if name and _matches(name, targets)]
    linears = [(name, m) for name, m in found if type(m) is nn.Linear]
    others = [f"{name} ({type(m).__name__})" for name, m in found if type(m) is not nn.Linear]
    if others:
        raise UserError(f"--lora-targets {','.join(targets)} names layers that are not nn.Linear: "
                        f"{', '.join(others[:2])}; LoRA here adapts linear layers, e.g. to_q, to_k, to_v, "
                        "to_out.0, ff.net.0.proj, ff.net.2")
    missing = [t for t in targets if not any(_matches(name, (t,)) for name, _ in linears)]
    if missing:
        raise UserError(f"--lora-targets: no layer of the U-Net is named {', '.join(missing)}; use module names "
                        f"such as {', '.join(DEFAULT_TARGETS)}, ff.net.0.proj, ff.net.2 or attn2.to_k")
    model.requires_grad_(False)
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha))
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_config(model: nn.Module) -> dict:
    """{"rank", "alpha", "targets"}: add_lora(model, **lora_config(...)) rebuilds the same adapters."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    # The wrapped layers' full paths: exact, whatever the targets were (a path matches itself in add_lora).
    return {"rank": first.rank, "alpha": first.alpha, "targets": list(layers)}


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block, back on after.

    Under gradient checkpointing a layer is recomputed in backward with the flags of that moment, so call
    backward outside this block for a forward made outside it (RPO's reference forward runs under no_grad
    in here, and its policy forward and backward outside: consistent).
    """
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, on in zip(layers, before):
            layer.enabled = on


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by `scale` (0 = base model, 1 = as trained)."""
    for layer in lora_layers(model).values():
        layer.scale = float(scale)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only: `<module path>.lora_A.weight` (r × k) and `.lora_B.weight` (d × r)."""
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight.detach()
            for name, layer in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, state: dict, source: str = "the LoRA") -> None:
    """Copy A and B into the model's adapters (add_lora first, with the same rank and targets); strict."""
    own = lora_state_dict(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        detail = "; ".join(f"{what} {', '.join(keys[:3])}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys)
        raise UserError(f"{source} does not fit the model's LoRA adapters ({detail})")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 += scale·(α/r)·B A) and put plain nn.Linear layers back.

    The merged model computes what the adapted one did, at the cost of one ordinary forward; its state
    dict is the base U-Net's, ready for any tool that loads a U-Net.
    """
    for name, layer in lora_layers(model).items():
        layer.weight += layer.delta_weight().to(layer.weight.dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias  # the same Parameters, now merged
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model
