"""The Triton kernels (tinyrpo/kernels.py) against the PyTorch reference (tinyrpo/rpo.py, tinyrpo/losses.py).

CI has no GPU: tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported, so the same
kernels run on CPU tensors through Triton's interpreter (numpy), launched through the registered
`torch.ops.tinyrpo.*` ops exactly as on a GPU. `test_kernels_run_in_interpreter` checks that this is
really what happens. The interpreter is slow, so every tensor here is tiny.
"""
import importlib.util
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from tests.util import max_rel_err
from tinyrpo import kernels, losses, rpo
from tinyrpo.dreambooth import dreambooth_loss, row_weights
from tinyrpo.errors import UserError

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

# (B pairs, per-sample shape, dtype). D = C·H·W: 140 fills part of one block; 1292 spills into a
# second, partly empty block (BLOCK = 1024); B = 17 > FINISH_ROWS makes the finishing loop run twice.
CASES = [
    (1, (4, 5, 7), torch.float32),
    (3, (4, 5, 7), torch.float32),
    (2, (4, 17, 19), torch.float32),
    (17, (1, 2, 3), torch.float32),
    (1, (4, 5, 7), torch.bfloat16),
    (2, (4, 17, 19), torch.bfloat16),
]
BETA = 50.0  # puts βΔ at a few units for these sizes: σ is neither 0.5 nor saturated


def make_pairs(B, shape, dtype, seed=0):
    """Predictions near the noise, as a trained U-Net's are; both halves share ε; y mixes 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(B, *shape, generator=g).repeat(2, *[1] * len(shape))
    model_pred = eps + 0.5 * torch.randn(2 * B, *shape, generator=g)
    ref_pred = eps + 0.5 * torch.randn(2 * B, *shape, generator=g)
    y = torch.tensor([(i + 1) % 2 for i in range(B)], dtype=torch.float32)  # 1, 0, 1, ...
    return model_pred.to(dtype), ref_pred.to(dtype), eps.to(dtype), y


def fused_rpo(*args) -> rpo.RPOLoss:
    """The fused op's outputs under RPOLoss's names, as its call site (rpo.rpo_forward) wraps them."""
    return rpo.RPOLoss(*kernels.fused_rpo_loss(*args))


def objective(out: rpo.RPOLoss, seed=1):
    """A scalar that sends a different incoming gradient into each of the four outputs."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(3, generator=g).tolist()
    v = torch.randn(out.delta.shape, generator=g)
    return a * out.loss + b * out.l_sim + c * out.l_pref + (v * out.delta).sum()


def assert_grad_close(grad, ref_grad):
    """fp32: to 1e-5 of the scale. bf16: the fp32 gradient cast to bf16, so within one bf16 ulp
    (2^-7 relative) of the fp32 reference. On a GPU the cast rounds to nearest (half an ulp), but
    Triton's interpreter truncates fp32 → bf16, hence the full ulp."""
    if grad.dtype == torch.bfloat16:
        err = (grad.double() - ref_grad.double()).abs()
        bound = 2.0 ** -7 * ref_grad.double().abs() + 1e-5 * ref_grad.abs().max().item()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    else:
        assert max_rel_err(grad, ref_grad) < 1e-5


@needs_triton
def test_kernels_run_in_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    assert kernels.INTERPRET and isinstance(kernels._sq_err_partials_kernel, InterpretedFunction)
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = fused_rpo(x, torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(1), 1.0)
    assert "tinyrpo_rpo_loss" in type(out.loss.grad_fn).__name__  # the op ran, not the reference


@needs_triton
@pytest.mark.parametrize("B,shape,dtype", CASES)
def test_rpo_loss_matches_reference(B, shape, dtype):
    model_pred, ref_pred, eps, y = make_pairs(B, shape, dtype)
    model_pred.requires_grad_()
    out = fused_rpo(model_pred, ref_pred, eps, y, BETA)
    objective(out).backward()

    # The reference on the same (bf16) inputs upcast: the kernels upcast on load the same way.
    ref_in = model_pred.detach().float().requires_grad_()
    ref = rpo.rpo_loss(ref_in, ref_pred.float(), eps.float(), y, BETA)
    objective(ref).backward()

    for name in rpo.RPOLoss._fields:
        assert getattr(out, name).dtype == torch.float32
        assert max_rel_err(getattr(out, name), getattr(ref, name)) < 1e-5, name
    assert model_pred.grad.dtype == dtype and model_pred.grad.shape == model_pred.shape
    assert_grad_close(model_pred.grad, ref_in.grad)


@needs_triton
def test_rpo_loss_awkward_inputs():
    """A non-contiguous bf16 prediction, fp32 noise, integer labels: as the reference, upcast."""
    B = 2
    model_pred, ref_pred, eps, y = make_pairs(B, (5, 7, 4), torch.float32)
    model_pred = model_pred.to(torch.bfloat16).permute(0, 3, 1, 2).requires_grad_()  # [2B, 4, 5, 7], strided
    ref_pred, eps, y = ref_pred.permute(0, 3, 1, 2), eps.permute(0, 3, 1, 2), y.long()
    out = fused_rpo(model_pred, ref_pred, eps, y, BETA)
    objective(out).backward()
    ref_in = model_pred.detach().float().requires_grad_()
    ref = rpo.rpo_loss(ref_in, ref_pred, eps, y, BETA)
    objective(ref).backward()
    for a, b in zip(out, ref):
        assert max_rel_err(a, b) < 1e-5
    assert model_pred.grad.shape == model_pred.shape
    assert_grad_close(model_pred.grad, ref_in.grad)
    with pytest.raises(RuntimeError, match="shape"):
        fused_rpo(model_pred, ref_pred[:, :3], eps, y, BETA)


@needs_triton
def test_rpo_backward_is_the_hand_derived_formula():
    """loss.backward() alone: winner rows get (1/B)(1 − β(σ(βΔ) − y))·2(pred − ε)/D, losers (β/B)(σ(βΔ) − y)·…"""
    B, shape = 2, (3, 4, 5)
    model_pred, ref_pred, eps, y = make_pairs(B, shape, torch.float32, seed=3)
    model_pred.requires_grad_()
    out = fused_rpo(model_pred, ref_pred, eps, y, BETA)
    out.loss.backward()

    D = math.prod(shape)
    s = torch.sigmoid(BETA * out.delta.detach()) - y
    coef = torch.cat([(1 - BETA * s) / B, BETA * s / B]).view(-1, 1, 1, 1)
    expected = coef * 2 * (model_pred.detach() - eps) / D
    assert max_rel_err(model_pred.grad, expected) < 1e-5
    # And the forward on hand-computed e's, eqs. (7)–(9).
    e = ((model_pred.detach() - eps) ** 2).mean(dim=(1, 2, 3))
    e_ref = ((ref_pred - eps) ** 2).mean(dim=(1, 2, 3))
    d = (e_ref[:B] - e[:B]) - (e_ref[B:] - e[B:])
    pref = F.binary_cross_entropy_with_logits(BETA * d, y)
    assert max_rel_err(out.delta, d) < 1e-5
    assert max_rel_err(out.loss, e[:B].mean() + pref) < 1e-5


@needs_triton
@pytest.mark.parametrize("B,shape,dtype", CASES)
def test_weighted_mse_matches_reference(B, shape, dtype):
    pred, target, _, _ = make_pairs(B, shape, dtype)
    N = pred.shape[0]
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(N, generator=g) * 3  # e.g. (1 − ᾱ_t)/ᾱ_t, which exceeds 1 at large t
    weights[0] = 0.0  # a sample switched off
    pred.requires_grad_()
    out = kernels.fused_weighted_mse(pred, target, weights)
    (0.7 * out).backward()

    ref_in = pred.detach().float().requires_grad_()
    ref = losses.weighted_mse(ref_in, target.float(), weights)
    (0.7 * ref).backward()

    assert out.dtype == torch.float32 and out.shape == ()
    assert max_rel_err(out, ref) < 1e-5
    assert pred.grad.dtype == dtype
    assert_grad_close(pred.grad, ref_in.grad)
    assert (pred.grad[0] == 0).all()


def test_reference_gradcheck():
    """The reference is what the kernels are tested against, so check its autograd in float64 first."""
    B = 2
    model_pred, ref_pred, eps, y = (t.double() for t in make_pairs(B, (1, 2, 3), torch.float32))
    model_pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda m: tuple(rpo.rpo_loss(m, ref_pred, eps, y, 5.0)), (model_pred,))
    weights = torch.rand(2 * B, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: losses.weighted_mse(p, ref_pred, weights), (model_pred,))


def test_dispatch(monkeypatch):
    """The call sites choose: CPU tensors (even under TRITON_INTERPRET=1) run the readable reference, bit for bit."""
    model_pred, ref_pred, eps, y = make_pairs(2, (2, 3, 3), torch.float32)
    assert not kernels.available(model_pred)
    out = rpo.rpo_forward(lambda *a: model_pred, lambda *a: ref_pred, None, None, None, eps, y, BETA, nullcontext())
    ref = rpo.rpo_loss(model_pred, ref_pred, eps, y, BETA)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    w = row_weights(2, 2, 0.5)
    assert torch.equal(dreambooth_loss(model_pred, ref_pred, 2, 0.5).loss, losses.weighted_mse(model_pred, ref_pred, w))
    # The kernels with CPU tensors and no interpreter cannot work: say so instead of crashing in Triton.
    monkeypatch.setattr(kernels, "INTERPRET", False)
    if kernels.HAS_TRITON:
        with pytest.raises(UserError, match="CUDA"):
            kernels.fused_rpo_loss(model_pred, ref_pred, eps, y, BETA)


def test_imports_without_triton(monkeypatch):
    """A CPU install has no Triton: the module must import, and the call sites then run the reference."""
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # makes `import triton` fail
    spec = importlib.util.spec_from_file_location("kernels_without_triton", kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a separate copy: registers no ops, leaves tinyrpo.kernels alone
    assert not module.HAS_TRITON
    model_pred, ref_pred, eps, y = make_pairs(1, (2, 3, 3), torch.float32)
    assert not module.available(model_pred.cuda() if torch.cuda.is_available() else model_pred)
    with pytest.raises(UserError, match="pip install triton"):
        module.fused_weighted_mse(model_pred, ref_pred, torch.ones(2))


def _train_step_loss(model_pred, ref_pred, eps, y, prior_pred, prior_target, weights, fused):
    if fused:
        out = fused_rpo(model_pred, ref_pred, eps, y, BETA)
        prior = kernels.fused_weighted_mse(prior_pred, prior_target, weights)
    else:  # the readable reference, what the call sites run on the CPU
        out = rpo.rpo_loss(model_pred, ref_pred, eps, y, BETA)
        prior = losses.weighted_mse(prior_pred, prior_target, weights)
    return out.loss + prior, out.delta


def _step_inputs():
    model_pred, ref_pred, eps, y = make_pairs(2, (4, 5, 7), torch.float32)
    prior_pred, prior_target, _, _ = make_pairs(1, (4, 5, 7), torch.float32, seed=4)
    return model_pred.requires_grad_(), ref_pred, eps, y, prior_pred.requires_grad_(), prior_target, torch.rand(2)


def _run(fn, inputs):
    loss, delta = fn(*inputs)
    grads = torch.autograd.grad(loss, [inputs[0], inputs[4]])
    return loss.detach(), delta.detach(), grads


@needs_triton
def test_compile_traces_fused_ops_without_graph_break():
    """What this verifies, on CPU under the interpreter:
    - Dynamo (fullgraph=True, so any graph break raises) captures ONE graph holding
      torch.ops.tinyrpo.rpo_loss and torch.ops.tinyrpo.weighted_mse as single nodes;
    - AOTAutograd puts both ops in the forward graph and their registered backward ops
      (tinyrpo.rpo_loss_backward, tinyrpo.weighted_mse_backward) in the backward graph;
    - the compiled step gives the same loss, Δ and gradients as eager.
    What it cannot verify here: Inductor compiling the kernels themselves. triton_op normally
    decomposes into the kernel calls inside AOTAutograd so Inductor sees them, but an interpreted
    kernel cannot be traced (under the interpreter wrap_triton hands back the raw kernel), so the
    decomposition is switched off and the ops stay opaque: the GPU path is untested in CI.
    """
    torch._dynamo.reset()
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs.setdefault(name, []).append(gm)
            return make_boxed_func(gm.forward)  # run the graph as traced: no optimisation
        return compiler

    aot = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def backend(gm, example_inputs):
        keep("dynamo")(gm, example_inputs)
        return aot(gm, example_inputs)

    def targets(name):  # Dynamo records the op packet (tinyrpo.rpo_loss), AOT the overload (….default)
        return {str(n.target).removesuffix(".default")
                for gm in graphs[name] for n in gm.graph.nodes if n.op == "call_function"}

    inputs = _step_inputs()
    step = torch.compile(lambda *a: _train_step_loss(*a, fused=True), fullgraph=True, backend=backend)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        compiled = _run(step, inputs)
    eager = _run(lambda *a: _train_step_loss(*a, fused=True), inputs)

    assert len(graphs["dynamo"]) == 1
    assert {"tinyrpo.rpo_loss", "tinyrpo.weighted_mse"} <= targets("dynamo")
    assert {"tinyrpo.rpo_loss", "tinyrpo.weighted_mse"} <= targets("forward")
    assert {"tinyrpo.rpo_loss_backward", "tinyrpo.weighted_mse_backward"} <= targets("backward")
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_compile_reference_path_with_inductor():
    """On CPU the reference runs: torch.compile (Inductor, fullgraph) must match eager (~15 s)."""
    torch._dynamo.reset()
    inputs = _step_inputs()
    step = torch.compile(lambda *a: _train_step_loss(*a, fused=False), fullgraph=True)
    compiled = _run(step, inputs)
    eager = _run(lambda *a: _train_step_loss(*a, fused=False), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
