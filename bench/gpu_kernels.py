"""bench/gpu.py's kernels section: tinyrpo/kernels.py's fused RPO loss against the PyTorch reference (values
and gradients, float64 oracle, fp32 and bf16, odd sizes), under torch.compile(fullgraph=True), and timed.
Kept apart from bench/gpu_sections.py because it changes with the kernels, not with the trainer or pipeline.
"""
import statistics
import time
from contextlib import nullcontext

import torch

from bench.gpu_record import Section, sync, timed
from tinyrpo import kernels, losses, rpo


def _pairs(B, shape, dtype, device, seed=0):
    """Predictions near the noise, as a trained U-Net's are; both halves share ε; y mixes 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(B, *shape, generator=g).repeat(2, *[1] * len(shape))
    model_pred = eps + 0.5 * torch.randn(2 * B, *shape, generator=g)
    ref_pred = eps + 0.5 * torch.randn(2 * B, *shape, generator=g)
    y = torch.tensor([(i + 1) % 2 for i in range(B)], dtype=torch.float32)
    return [t.to(device, dtype) for t in (model_pred, ref_pred, eps)] + [y.to(device)]


def _objective(out, seed=1):
    """A scalar sending a different incoming gradient into each of the four outputs of the RPO loss."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(3, generator=g).tolist()
    v = torch.randn(out.delta.shape, generator=g).to(out.delta.device, out.delta.dtype)
    return a * out.loss + b * out.l_sim + c * out.l_pref + (v * out.delta).sum()


def _rel(a, b, scale=None) -> float:
    """max |a − b| over max |b| (or over `scale`)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if scale is None else scale
    return (a - b).abs().max().item() / max(scale, 1e-30)


def _grad_err(grad, ref_grad, interpret: bool) -> float:
    """fp32: max error over the largest reference value. bf16: max error over its bound, one rounding of the
    exact gradient to bf16 (half an ulp, 2^-8 relative; a full ulp under the interpreter, which truncates)
    plus 1e-5 of the scale: <= 1 passes."""
    if grad.dtype != torch.bfloat16:
        return _rel(grad, ref_grad)
    err = (grad.double() - ref_grad.double()).abs()
    bound = 2.0 ** (-7 if interpret else -8) * ref_grad.double().abs() + 1e-5 * ref_grad.abs().max().item()
    return (err / bound).max().item()


def kernels_section(sec: Section):
    if not kernels.HAS_TRITON:
        sec.note("Triton is not importable here: the fused kernels cannot run (pip install triton)")
    beta, dev, interp = 50.0, sec.device, kernels.INTERPRET
    tol = {"rel_err": 1e-5, "grad_err fp32": 1e-5, "grad_err bf16": 1.0}
    sec.note("pass: every output (L, L_sim, L_pref, Δ) within 1e-5 of the float64 reference, relative to its largest "
             "value (Δ: to L_sim, the scale of the errors it is the difference of); fp32 gradients likewise; bf16 gradients within one rounding of the exact value (err ÷ bound ≤ 1: "
             "half an ulp on a GPU, a full ulp under the interpreter, which truncates)")

    def rpo_case(B, shape, dtype):
        model_pred, ref_pred, eps, y = _pairs(B, shape, dtype, dev)
        model_pred.requires_grad_()
        out = rpo.RPOLoss(*kernels.fused_rpo_loss(model_pred, ref_pred, eps, y, beta))
        _objective(out).backward()
        ref_in = model_pred.detach().double().requires_grad_()  # the reference on the same inputs, float64
        ref = rpo.rpo_loss(ref_in, ref_pred.double(), eps.double(), y.double(), beta)
        _objective(ref).backward()
        # Δ is a difference of per-sample errors e (eq. 8): its rounding error is that of e, so it is measured
        # on e's scale (L_sim), not on its own, which shrinks as 1/√D while fp32 sums of D squares do not.
        errs = [_rel(out.loss, ref.loss), _rel(out.l_sim, ref.l_sim), _rel(out.l_pref, ref.l_pref),
                _rel(out.delta, ref.delta, scale=max(ref.delta.abs().max().item(), ref.l_sim.item()))]
        return _verdict(max(errs), _grad_err(model_pred.grad, ref_in.grad, interp), dtype, tol)

    def mse_case(B, shape, dtype):
        pred, target, _, _ = _pairs(B, shape, dtype, dev)
        w = (torch.rand(pred.shape[0], generator=torch.Generator().manual_seed(2)) * 3).to(dev)
        pred.requires_grad_()
        out = kernels.fused_weighted_mse(pred, target, w)
        (0.7 * out).backward()
        ref_in = pred.detach().double().requires_grad_()
        ref = losses.weighted_mse(ref_in, target.double(), w.double())
        (0.7 * ref).backward()
        return _verdict(_rel(out, ref), _grad_err(pred.grad, ref_in.grad, interp), dtype, tol)

    for B, shape in sec.sizes.kernel_cases:
        for dtype in (torch.float32, torch.bfloat16):
            d = "fp32" if dtype == torch.float32 else "bf16"
            sec.item(f"rpo_loss B={B} {tuple(shape)} {d}", lambda: rpo_case(B, shape, dtype))
            sec.item(f"weighted_mse N={2 * B} {tuple(shape)} {d}", lambda: mse_case(B, shape, dtype))
    sec.item("torch.compile(fullgraph=True)", lambda: _kernels_compiled(sec, beta), est_s=10)
    for B in (1, 16) if sec.cuda else (1,):
        sec.item(f"time rpo_loss fwd+bwd, {B} pair(s) of 4x{sec.sizes.latent}x{sec.sizes.latent} bf16",
                 lambda: _kernels_timing(sec, B, beta))


def _verdict(rel_err, grad_err, dtype, tol):
    grad_tol = tol["grad_err bf16"] if dtype == torch.bfloat16 else tol["grad_err fp32"]
    return {"rel_err": rel_err, "grad_err": grad_err, "pass": rel_err <= tol["rel_err"] and grad_err <= grad_tol}


def _kernels_compiled(sec: Section, beta: float):
    """One training loss (RPO loss + a weighted MSE) compiled with fullgraph=True: a graph break raises."""
    def step(model_pred, ref_pred, eps, y, prior_pred, prior_target, w):
        out = rpo.RPOLoss(*kernels.fused_rpo_loss(model_pred, ref_pred, eps, y, beta))
        return out.loss + kernels.fused_weighted_mse(prior_pred, prior_target, w), out.delta

    L = sec.sizes.latent
    model_pred, ref_pred, eps, y = _pairs(2, (4, L, L), torch.bfloat16, sec.device)
    prior_pred, prior_target, _, _ = _pairs(1, (4, L, L), torch.bfloat16, sec.device, seed=4)
    w = torch.rand(2, generator=torch.Generator().manual_seed(3)).to(sec.device)
    inputs = [model_pred.requires_grad_(), ref_pred, eps, y, prior_pred.requires_grad_(), prior_target, w]

    def run(fn):
        loss, delta = fn(*inputs)
        grads = torch.autograd.grad(loss, [inputs[0], inputs[4]])
        return [loss.detach(), delta.detach(), *grads]

    torch._dynamo.reset()
    if kernels.INTERPRET:
        # An interpreted kernel cannot be traced into Inductor (see tests/test_kernels.py): the ops stay
        # opaque under AOTAutograd. On CUDA this is Inductor, with the kernels decomposed into its graph.
        backend = "aot_eager"
        patch = torch._functorch.config.patch(decompose_custom_triton_ops=False)
    else:
        backend, patch = "inductor", nullcontext()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    res = {"backend": backend, "graph": "one graph (fullgraph=True: a graph break would have raised)"}
    with patch:
        if backend == "inductor":  # and did Inductor get the kernels themselves, forward and backward?
            from torch._inductor.utils import run_and_get_code
            got, code = run_and_get_code(run, compiled)
            res["kernels_in_inductor_code"] = {k: k in "\n".join(code) for k in (
                "_sq_err_partials_kernel", "_rpo_finish_kernel", "_rpo_backward_kernel",
                "_weighted_mse_finish_kernel", "_weighted_mse_backward_kernel")}
        else:
            got = run(compiled)
        sync(sec.device)
        first = time.perf_counter() - t0
        again = statistics.median(timed(lambda: run(compiled), sec.device, 5))
    eager = run(step)
    err = max(_rel(a, b) for a, b in zip(got, eager))
    torch._dynamo.reset()
    return res | {"first_call_s": first, "ms": 1e3 * again, "rel_err": err, "pass": err <= 1e-5}


def _kernels_timing(sec: Section, B: int, beta: float):
    """Fused kernels vs the PyTorch reference (rpo.rpo_loss), forward + backward, as the train step calls them."""
    L = sec.sizes.latent
    model_pred, ref_pred, eps, y = _pairs(B, (4, L, L), torch.bfloat16, sec.device)
    model_pred.requires_grad_()
    n = 50 if sec.cuda else 2
    res = {}
    for name, loss_fn in (("fused", kernels.fused_rpo_loss), ("reference", rpo.rpo_loss)):
        def once():  # autograd.grad: no .grad accumulation inside the timing (the loss is output 0 of both)
            torch.autograd.grad(loss_fn(model_pred, ref_pred, eps, y, beta)[0], model_pred)
        timed(once, sec.device, 3 if sec.cuda else 1)
        res[f"{name}_us"] = 1e6 * statistics.median(timed(once, sec.device, n))
    res["speedup"] = res["reference_us"] / res["fused_us"]
    return res
