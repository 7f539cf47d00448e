"""Fused Triton kernels for the two denoising losses: the RPO loss (eqs. 7–9) and the weighted MSE.

Why fuse. The RPO loss reads three [2B, 4, 64, 64] tensors (policy prediction, frozen reference
prediction, noise). Written in PyTorch (`tinyrpo.rpo.rpo_loss`) it makes about ten passes over them:
two upcasts, two subtractions, two squares, two means, then the backward writes its own temporaries
(2·(pred − ε)/D, the broadcast of the per-sample coefficient, the downcast). Every pass is a full
read and write of memory for almost no arithmetic. Here the forward reads each tensor once and writes
only B-sized results; the backward reads model_pred and ε once and writes the gradient once.

Forward, two kernels:
  1. `_sq_err_partials_kernel`, a 2D grid over (sample n, block b of D = C·H·W elements): each program
     sums (pred − ε)² and (ref − ε)² over its block in float32 and stores one partial per
     (n, b). This is a split reduction rather than atomics on [2B] accumulators: the partial buffer
     is tiny (2B × D/1024 floats), needs no zero-init, and the sum is bitwise reproducible from run
     to run (atomic float adds land in arbitrary order).
  2. `_rpo_finish_kernel`, one program: sums the partials into e = SSE / D per sample, then Δ, L_sim,
     L_pref and L exactly as `tinyrpo.rpo`. B is a handful of pairs, so one program is plenty.

Backward, derived by hand. Per sample e_n = (1/D) Σ_j (pred_nj − ε_nj)², so ∂e_n/∂pred_nj =
2(pred_nj − ε_nj)/D. Pair i has a winner row w_i = i and a loser row l_i = B + i, and
    L_sim  = (1/B) Σ_i e_θ(w_i)
    L_pref = (1/B) Σ_i BCE(βΔ_i, y_i),  BCE(z, y) = softplus(z) − y·z,  ∂BCE/∂z = σ(z) − y
    Δ_i    = (e_ref(w_i) − e_θ(w_i)) − (e_ref(l_i) − e_θ(l_i))
    L      = L_sim + L_pref.
With incoming gradients g_L, g_sim, g_pref (scalars) and g_Δ ([B]) for the four outputs:
    ∂/∂Δ_i       = (g_L + g_pref)·(β/B)·(σ(βΔ_i) − y_i) + g_Δ,i                =: G_i
    ∂/∂e_θ(w_i) = (g_L + g_sim)/B − G_i       (Δ_i falls when e_θ(w_i) grows)
    ∂/∂e_θ(l_i) = +G_i
so for the plain loss (g_L = 1, rest 0) a winner row gets (1/B)·(1 − β(σ(βΔ_i) − y_i)) and a loser row
(β/B)·(σ(βΔ_i) − y_i), each times 2(pred − ε)/D. `_rpo_backward_kernel` computes that per-row
coefficient from Δ (saved by the forward) and writes ∂/∂model_pred in one pass. ref_pred, ε and y get
no gradient (the reference U-Net is frozen).

The weighted MSE, mean_n w_n·e_n (L_sim alone, DreamBooth's prior loss, per-timestep weights such as
(1 − ᾱ_t)/ᾱ_t), reuses the partials kernel; its gradient is g·(w_n/N)·2(pred − target)/D.

Both are `torch.library.triton_op`s (`torch.ops.tinyrpo.rpo_loss`, `torch.ops.tinyrpo.weighted_mse`)
with `register_autograd`, so `torch.compile(fullgraph=True)` traces through them without a graph
break and Inductor sees the kernels. This module only holds the kernels: the losses are written once, in
PyTorch (`tinyrpo.rpo.rpo_loss`, `tinyrpo.losses.weighted_mse`), and their call sites
(`tinyrpo.rpo.rpo_forward`, `tinyrpo.dreambooth.dreambooth_loss`) run `fused_rpo_loss` / `fused_weighted_mse`
instead where `available(tensor)` says so (CUDA tensors, Triton installed); both give the same numbers.
Under TRITON_INTERPRET=1 the kernels also run on CPU tensors when called by name (that is how the tests
run them).
"""
import os

import torch

from tinyrpo.errors import UserError

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # a CPU-only install has no Triton: the call sites run the PyTorch reference
    triton = None

HAS_TRITON = triton is not None
# Triton's interpreter runs kernels on CPU tensors with numpy (slow, but exact enough for tests).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 1024  # elements per program: 4 warps × 32 threads × 8 contiguous elements
FINISH_ROWS = 16  # samples per step of the single-program finishing loop


def available(t: torch.Tensor) -> bool:
    """Whether a loss on `t` should run the fused kernels: a CUDA tensor, with Triton installed. (Under
    TRITON_INTERPRET=1 the kernels also run on CPU tensors, but only the tests ask for that, by name.)"""
    return HAS_TRITON and t.is_cuda


def _check_runnable(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise UserError("the fused kernels need Triton: `pip install triton` (or call the PyTorch reference, "
                        "tinyrpo.rpo.rpo_loss or tinyrpo.losses.weighted_mse)")
    if not (t.is_cuda or INTERPRET):
        raise UserError("the fused kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU)")


def fused_rpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, noise: torch.Tensor,
                   y: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tinyrpo.rpo.rpo_loss` (eq. 9) fused into Triton kernels: -> (loss, l_sim, l_pref, delta), the fields
    of `tinyrpo.rpo.RPOLoss` in its order."""
    _check_runnable(model_pred)
    return torch.ops.tinyrpo.rpo_loss(model_pred, ref_pred, noise, y, float(beta))


def fused_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`tinyrpo.losses.weighted_mse`, mean_n w_n·e_n, fused into Triton kernels.

    Only `pred` gets a gradient (targets and weights are data, not parameters).
    """
    _check_runnable(pred)
    return torch.ops.tinyrpo.weighted_mse(pred, target, weights)


if HAS_TRITON:

    # ------------------------------------------------------------------------ kernels

    @triton.jit
    def _sq_err_partials_kernel(pred_ptr, ref_ptr, target_ptr, part_ptr, ref_part_ptr, D, P,
                                HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
        """part[n, b] = Σ_{j in block b} (pred − target)²_nj, and the same for ref when HAS_REF."""
        n = tl.program_id(0)
        b = tl.program_id(1)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D  # the last block of a sample is partly empty when BLOCK does not divide D
        base = n.to(tl.int64) * D  # int64: 2B·D overflows int32 for large batches
        # Upcast on load: squares of bf16 values summed over thousands of elements need fp32.
        target = tl.load(target_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - target
        tl.store(part_ptr + n * P + b, tl.sum(diff * diff, axis=0))
        if HAS_REF:  # the RPO loss reads the reference prediction in the same pass, sharing ε
            diff = tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - target
            tl.store(ref_part_ptr + n * P + b, tl.sum(diff * diff, axis=0))

    @triton.jit
    def _softplus(x):
        """log(1 + eˣ) = max(x, 0) + log1p(e^−|x|): exp never overflows."""
        t = tl.exp(-tl.abs(x))
        # log1p(t) to full precision without libdevice (which the interpreter lacks): the rounding
        # error of u = 1 + t cancels in t·log(u)/(u − 1) (Goldberg 1991, Theorem 4).
        u = 1.0 + t
        log1p_t = tl.where(u == 1.0, t, tl.log(u) * t / tl.where(u == 1.0, 1.0, u - 1.0))
        return tl.maximum(x, 0.0) + log1p_t

    @triton.jit
    def _rpo_finish_kernel(part_ptr, ref_part_ptr, y_ptr, delta_ptr, loss_ptr, sim_ptr, pref_ptr,
                           beta, B, D, P, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
        """Partials → e → Δ (eq. 8), L_sim (eq. 7), L_pref (eq. 8), L (eq. 9). One program."""
        cols = tl.arange(0, BLOCK_P)
        sim_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        pref_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for start in range(0, B, BLOCK_B):
            i = start + tl.arange(0, BLOCK_B)  # pair indices; winner row i, loser row B + i
            ok = i < B
            mask = ok[:, None] & (cols[None, :] < P)
            win = i[:, None] * P + cols[None, :]
            lose = (B + i[:, None]) * P + cols[None, :]
            e_theta_w = tl.sum(tl.load(part_ptr + win, mask=mask, other=0.0), axis=1) / D
            e_theta_l = tl.sum(tl.load(part_ptr + lose, mask=mask, other=0.0), axis=1) / D
            e_ref_w = tl.sum(tl.load(ref_part_ptr + win, mask=mask, other=0.0), axis=1) / D
            e_ref_l = tl.sum(tl.load(ref_part_ptr + lose, mask=mask, other=0.0), axis=1) / D
            d = (e_ref_w - e_theta_w) - (e_ref_l - e_theta_l)
            tl.store(delta_ptr + i, d, mask=ok)
            # BCE(z, y) = y·softplus(−z) + (1 − y)·softplus(z) on z = βΔ: for y ∈ {0, 1} one term
            # is exactly 0, so a small loss is not the difference of two large numbers.
            z = beta * d
            y = tl.load(y_ptr + i, mask=ok, other=0.0)
            bce = y * _softplus(-z) + (1.0 - y) * _softplus(z)
            sim_acc += tl.where(ok, e_theta_w, 0.0)
            pref_acc += tl.where(ok, bce, 0.0)
        l_sim = tl.sum(sim_acc, axis=0) / B
        l_pref = tl.sum(pref_acc, axis=0) / B
        tl.store(loss_ptr, l_sim + l_pref)
        tl.store(sim_ptr, l_sim)
        tl.store(pref_ptr, l_pref)

    @triton.jit
    def _rpo_backward_kernel(pred_ptr, noise_ptr, grad_ptr, delta_ptr, y_ptr,
                             g_loss_ptr, g_sim_ptr, g_pref_ptr, g_delta_ptr, beta, B, D,
                             BLOCK: tl.constexpr):
        """∂/∂model_pred = c_n · 2(pred − ε)/D with the per-row coefficient c_n derived in the docstring."""
        n = tl.program_id(0)
        b = tl.program_id(1)
        i = n % B  # the pair this row belongs to
        # Every program recomputes its row's coefficient from a few scalars: cheaper than a launch.
        g_loss = tl.load(g_loss_ptr)
        G = (g_loss + tl.load(g_pref_ptr)) * (beta / B) * \
            (tl.sigmoid(beta * tl.load(delta_ptr + i)) - tl.load(y_ptr + i)) + tl.load(g_delta_ptr + i)
        coef = tl.where(n < B, (g_loss + tl.load(g_sim_ptr)) / B - G, G)  # winner rows come first

        offs = b * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        base = n.to(tl.int64) * D
        diff = (tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                - tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
        grad = coef * (2.0 / D) * diff
        tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _weighted_mse_finish_kernel(part_ptr, w_ptr, out_ptr, N, D, P,
                                    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        """Partials → mean_n w_n·e_n. One program."""
        cols = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            ok = n < N
            mask = ok[:, None] & (cols[None, :] < P)
            e = tl.sum(tl.load(part_ptr + n[:, None] * P + cols[None, :], mask=mask, other=0.0), axis=1) / D
            acc += tl.load(w_ptr + n, mask=ok, other=0.0) * e
        tl.store(out_ptr, tl.sum(acc, axis=0) / N)

    @triton.jit
    def _weighted_mse_backward_kernel(pred_ptr, target_ptr, w_ptr, g_ptr, grad_ptr, N, D,
                                      BLOCK: tl.constexpr):
        """∂/∂pred = g · (w_n / N) · 2(pred − target)/D."""
        n = tl.program_id(0)
        b = tl.program_id(1)
        coef = tl.load(g_ptr) * tl.load(w_ptr + n) / N
        offs = b * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        base = n.to(tl.int64) * D
        diff = (tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                - tl.load(target_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
        grad = coef * (2.0 / D) * diff
        tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    # ------------------------------------------------------------------------ ops
    # triton_op bodies launch through wrap_triton so that torch.compile can trace into them.

    def _check_shapes(pred, *others, n_weights=None):
        # The kernels index raw pointers: a shape mismatch would read out of bounds, not raise.
        for t in others:
            torch._check(t.shape == pred.shape, lambda: f"shape {tuple(t.shape)} != {tuple(pred.shape)}")
        if n_weights is not None:
            torch._check(n_weights.shape == pred.shape[:1],
                         lambda: f"expected {pred.shape[0]} per-sample values, got {tuple(n_weights.shape)}")

    def _partials(pred, ref, target):
        """Per-sample squared-error partial sums, [N, P] each (ref's is None without ref)."""
        N, D = pred.shape[0], pred[0].numel()
        P = triton.cdiv(D, BLOCK)
        part = torch.empty(N, P, device=pred.device, dtype=torch.float32)
        ref_part = torch.empty_like(part) if ref is not None else part
        wrap_triton(_sq_err_partials_kernel)[(N, P)](
            pred, ref if ref is not None else pred, target, part, ref_part, D, P,
            HAS_REF=ref is not None, BLOCK=BLOCK, num_warps=4)
        return part, (ref_part if ref is not None else None)

    @triton_op("tinyrpo::rpo_loss", mutates_args={})
    def _rpo_loss_op(model_pred: torch.Tensor, ref_pred: torch.Tensor, noise: torch.Tensor,
                     y: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(model_pred.shape[0] % 2 == 0, lambda: "model_pred must hold 2B samples: B winners, B losers")
        _check_shapes(model_pred, ref_pred, noise)
        torch._check(y.shape == (model_pred.shape[0] // 2,), lambda: f"y must have shape [B], got {tuple(y.shape)}")
        model_pred, ref_pred, noise = model_pred.contiguous(), ref_pred.contiguous(), noise.contiguous()
        B = model_pred.shape[0] // 2
        D = model_pred[0].numel()
        part, ref_part = _partials(model_pred, ref_pred, noise)
        f32 = dict(device=model_pred.device, dtype=torch.float32)
        delta = torch.empty(B, **f32)
        loss, sim, pref = torch.empty((), **f32), torch.empty((), **f32), torch.empty((), **f32)
        wrap_triton(_rpo_finish_kernel)[(1,)](
            part, ref_part, y.to(torch.float32).contiguous(), delta, loss, sim, pref,
            beta, B, D, part.shape[1], BLOCK_B=FINISH_ROWS, BLOCK_P=triton.next_power_of_2(part.shape[1]))
        return loss, sim, pref, delta

    @triton_op("tinyrpo::rpo_loss_backward", mutates_args={})
    def _rpo_loss_backward_op(model_pred: torch.Tensor, noise: torch.Tensor, delta: torch.Tensor,
                              y: torch.Tensor, beta: float, g_loss: torch.Tensor, g_sim: torch.Tensor,
                              g_pref: torch.Tensor, g_delta: torch.Tensor) -> torch.Tensor:
        model_pred, noise = model_pred.contiguous(), noise.contiguous()
        N, D = model_pred.shape[0], model_pred[0].numel()
        grad = torch.empty_like(model_pred)
        f32 = dict(dtype=torch.float32)
        wrap_triton(_rpo_backward_kernel)[(N, triton.cdiv(D, BLOCK))](
            model_pred, noise, grad, delta, y.to(**f32).contiguous(), g_loss.to(**f32), g_sim.to(**f32),
            g_pref.to(**f32), g_delta.to(**f32).contiguous(), beta, N // 2, D, BLOCK=BLOCK, num_warps=4)
        return grad

    def _rpo_setup_context(ctx, inputs, output):
        model_pred, _, noise, y, beta = inputs
        ctx.save_for_backward(model_pred, noise, output[3], y)
        ctx.beta = beta

    def _rpo_backward(ctx, g_loss, g_sim, g_pref, g_delta):
        model_pred, noise, delta, y = ctx.saved_tensors
        grad = torch.ops.tinyrpo.rpo_loss_backward(model_pred, noise, delta, y, ctx.beta,
                                                   g_loss, g_sim, g_pref, g_delta)
        return grad, None, None, None, None

    _rpo_loss_op.register_autograd(_rpo_backward, setup_context=_rpo_setup_context)

    # Shapes only, for torch.compile's fake tensors. triton_op would trace the body instead, which
    # works on a GPU but not under TRITON_INTERPRET (the interpreted kernel would run on fake data).
    @_rpo_loss_op.register_fake
    def _(model_pred, ref_pred, noise, y, beta):
        scalar = model_pred.new_empty((), dtype=torch.float32)
        return scalar, scalar.clone(), scalar.clone(), model_pred.new_empty(model_pred.shape[0] // 2, dtype=torch.float32)

    @_rpo_loss_backward_op.register_fake
    def _(model_pred, noise, delta, y, beta, g_loss, g_sim, g_pref, g_delta):
        return torch.empty_like(model_pred, memory_format=torch.contiguous_format)

    @triton_op("tinyrpo::weighted_mse", mutates_args={})
    def _weighted_mse_op(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        _check_shapes(pred, target, n_weights=weights)
        pred, target = pred.contiguous(), target.contiguous()
        N, D = pred.shape[0], pred[0].numel()
        part, _ = _partials(pred, None, target)
        out = torch.empty((), device=pred.device, dtype=torch.float32)
        wrap_triton(_weighted_mse_finish_kernel)[(1,)](
            part, weights.to(torch.float32).contiguous(), out, N, D, part.shape[1],
            BLOCK_N=FINISH_ROWS, BLOCK_P=triton.next_power_of_2(part.shape[1]))
        return out

    @triton_op("tinyrpo::weighted_mse_backward", mutates_args={})
    def _weighted_mse_backward_op(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                                  g: torch.Tensor) -> torch.Tensor:
        pred, target = pred.contiguous(), target.contiguous()
        N, D = pred.shape[0], pred[0].numel()
        grad = torch.empty_like(pred)
        wrap_triton(_weighted_mse_backward_kernel)[(N, triton.cdiv(D, BLOCK))](
            pred, target, weights.to(torch.float32).contiguous(), g.to(torch.float32), grad, N, D,
            BLOCK=BLOCK, num_warps=4)
        return grad

    def _weighted_mse_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _weighted_mse_backward(ctx, g):
        pred, target, weights = ctx.saved_tensors
        grad = torch.ops.tinyrpo.weighted_mse_backward(pred, target, weights, g)
        return grad, None, None

    _weighted_mse_op.register_autograd(_weighted_mse_backward, setup_context=_weighted_mse_setup_context)

    @_weighted_mse_op.register_fake
    def _(pred, target, weights):
        return pred.new_empty((), dtype=torch.float32)

    @_weighted_mse_backward_op.register_fake
    def _(pred, target, weights, g):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)
