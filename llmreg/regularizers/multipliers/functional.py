"""Pure functions of learnable multipliers: the multiplied linear map, the multiplied embedding, the merge.

Notation (spec ../shared/methods/multipliers.md, paper Eqs. 2-4): W_eff = diag(s * r) W diag(c) for a
linear layer W [d_out, d_in] with row multipliers r [d_out], column multipliers c [d_in] and a scalar s.
Here `row` is the combined row scale s * r (autograd splits its gradient into s and r) and `col` is c;
either may be None (absent).

Cost of the forward. `multiplied_linear` is one `autograd.Function` whose forward builds W_eff as a
temporary, runs one GEMM with it and saves only (x, W, row, col): exactly what a plain linear layer
saves, so there is no extra activation memory and no saved copy of W_eff (the spec's warning is about
autograd keeping W_eff alive; here it is freed right after the GEMM and rebuilt in backward). Its
backward applies the paper's gradient identities with M = g^T x (the GEMM a plain linear computes for
dL/dW anyway):

    dL/dx   = g @ W_eff
    dL/dW   = row[:, None] * M * col[None, :]
    dL/drow = (M * W) @ col            (sum_j W_ij c_j M_ij)
    dL/dcol = row @ (M * W)            (sum_i r_i W_ij M_ij)

All extra element-wise work is on weight-sized tensors (d_out x d_in), not on activation-sized ones
(tokens x (d_in + d_out)): with training batches of thousands of tokens per micro-step the weight-sized
form moves several times fewer bytes than scaling the activations (the spec's pseudo-code), and it
adds no activation memory at all. The activation form is kept as `explicit_linear` (option
`impl="explicit"`), the reference the tests compare against.

Precision: W_eff is formed in fp32 (the multipliers' dtype) and cast to the dtype the GEMM runs in (the
autocast dtype under autocast, else the input's), as autocast would cast W itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def effective_weight(weight: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
    """W_eff = row[:, None] * W * col[None, :] in at least fp32 (W itself when both are None)."""
    if row is None and col is None:
        return weight
    acc = _acc(weight)
    # one new tensor, then in place: two passes over a weight-sized buffer
    w = weight * row.to(acc)[:, None] if row is not None else weight * col.to(acc)[None, :]
    if row is not None and col is not None:
        w.mul_(col.to(acc)[None, :])
    return w


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit tensors, else their own."""
    return torch.promote_types(t.dtype, torch.float32)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


class _MultipliedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, row, col):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w_eff = effective_weight(weight, row, col).to(dtype)
            y = F.linear(x.to(dtype), w_eff)
        ctx.save_for_backward(x, weight, row, col)
        ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, row, col = ctx.saved_tensors
        need_x, need_w, need_row, need_col = ctx.needs_input_grad
        dtype = ctx.dtype
        grad_x = grad_w = grad_row = grad_col = None
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(dtype)
            spare = None  # a free weight-sized fp32 buffer, reused for M * W (one allocation fewer per layer)
            if need_x:
                w_eff = effective_weight(weight, row, col)
                grad_x = (g @ w_eff.to(dtype)).to(x.dtype)
                spare = w_eff if w_eff is not weight else None
            if need_w or need_row or need_col:
                g2 = g.reshape(-1, g.shape[-1])
                x2 = x.to(dtype).reshape(-1, x.shape[-1])
                acc = _acc(weight)
                m = (g2.t() @ x2).to(acc)  # dL/dW_eff, [d_out, d_in]
                if need_row or need_col:
                    w_acc = weight.to(acc)
                    usable = spare is not None and spare.dtype == acc and spare.shape == m.shape
                    mw = torch.mul(m, w_acc, out=spare) if usable else m * w_acc
                    if need_row:
                        grad_row = (mw @ col.to(acc) if col is not None else mw.sum(1)).to(row.dtype)
                    if need_col:
                        grad_col = (row.to(acc) @ mw if row is not None else mw.sum(0)).to(col.dtype)
                if need_w:
                    if row is not None:
                        m.mul_(row.to(acc)[:, None])  # m is ours: scale it in place into dL/dW
                    if col is not None:
                        m.mul_(col.to(acc)[None, :])
                    grad_w = m.to(weight.dtype)
        return grad_x, grad_w, grad_row, grad_col


def multiplied_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    row: torch.Tensor | None,
    col: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W_eff^T + b without keeping W_eff for backward (see the module docstring). The bias is not scaled."""
    if row is None and col is None:
        y = F.linear(x, weight)
    else:
        y = _MultipliedLinear.apply(x, weight, row, col)
    return y if bias is None else y + bias


def explicit_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    row: torch.Tensor | None,
    col: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec's form: scale the input features by c, the outputs by s * r; plain autograd."""
    if col is not None:
        x = x * col.to(x.dtype)
    y = F.linear(x, weight)
    if row is not None:
        y = y * row.to(y.dtype)
    return y if bias is None else y + bias


def multiplied_embedding(
    ids: torch.Tensor, table: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None, **embedding_kwargs
) -> torch.Tensor:
    """E[ids] * r_tok[ids, None] * c: per-token row and per-feature column multipliers."""
    out = F.embedding(ids, table, **embedding_kwargs)
    if row is not None:
        out = out * F.embedding(ids, row[:, None], embedding_kwargs.get("padding_idx")).to(out.dtype)
    if col is not None:
        out = out * col.to(out.dtype)
    return out


def merge_linear(weight: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
    """The plain weight equal to the multiplied layer: ((s r)[:, None] * W * c[None, :]) in W's dtype.
    Embeddings merge the same way (per-token rows, per-feature columns)."""
    return effective_weight(weight.to(_acc(weight)), row, col).to(weight.dtype)
