"""A model loaded once, onto which candidates are applied and removed cheaply.

At construction every block's heads and MLP channels are reordered by importance, in
place (a permutation of heads or channels does not change what the model computes).
After that, a candidate is a width per block: applying it replaces each projection
with a view of the first rows/columns of the sorted weights (a copy only for the query
heads of GQA models in ``per-group`` mode), adds bias compensation (one small
matrix-vector product per projection), and never reloads anything. ``restore()`` puts
the original module objects back, so going back to dense is exact.

With ``refit=True`` the consumers of the removed channels (``o_proj``, ``down_proj``) are
not only sliced but refitted: the kept columns W' minimise the projection's output error
over the calibration activations, E‖(x−μ)Wᵀ − (x_K−μ_K)W'ᵀ‖², so W' = W Σ[:, K] (Σ_KK + λI)⁻¹
and the bias takes what is left of the mean (bias compensation is the special case
W' = W[:, K]). Kept channels are a prefix of the sorted order wherever the head mode
allows, and the Cholesky factor of a leading block is the leading block of the full
factor, so one factorisation per projection serves every width; a refit costs one matrix
product (see `_Refit`), and the last few widths of each projection are kept.

``mode="mask"`` keeps the dense shapes and zeroes the pruned channels' inputs instead:
slower, but an independent path that the tests compare slicing with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .architecture import geometry_of
from .calibration import CalibrationStats
from .hf_code.modeling_selfpruner import EmptyAttention
from .importance import LayerScores
from .memory_plan import REFIT_CACHE
from .structure import PrunePlan, effective_head_mode

MODES = ("slice", "mask")
REFIT_DAMPING = 0.01  # λ as a fraction of the mean channel variance, as GPTQ/SparseGPT damp


@dataclass
class _Refit:
    """What refits one projection (o_proj or down_proj of a block) at any width, float32.

    With Σ + λI = L Lᵀ over the sorted input channels, a prefix of c channels has
    W' = W Σ[:, :c] (L_c L_cᵀ)⁻¹ = P[:, :c] · L⁻¹[:c, :c], where P = W Σ L⁻ᵀ: the leading
    block of L⁻¹ is the inverse of L's leading block, and multiplying by the upper-triangular
    L⁻ᵀ keeps leading columns. So a prefix costs one matrix product, and W and Σ need not be
    kept. `cov` stays only where kept sets need not be prefixes (query heads per group)."""
    p: torch.Tensor  # [out, in]  W Σ L⁻ᵀ
    linv: torch.Tensor  # [in, in]  L⁻¹, lower triangular
    mean: torch.Tensor  # [in]  input channel means
    base: torch.Tensor  # [out]  W μ + b: the output's mean, which the bias keeps
    cov: torch.Tensor | None
    damping: float
    cache: OrderedDict


def _refit_state(stats, order: torch.Tensor, linear: nn.Linear, *, keep_cov: bool) -> _Refit:
    device, f32 = linear.weight.device, torch.float32
    cov = stats.covariance[order][:, order].to(device, f32)
    damping = REFIT_DAMPING * cov.diagonal().mean().clamp_min(1e-12).item()
    eye = torch.eye(cov.shape[0], device=device, dtype=f32)
    for _ in range(8):  # a (near-)constant channel: damp harder rather than fail
        chol, info = torch.linalg.cholesky_ex(cov + damping * eye)
        if info.item() == 0:
            break
        damping *= 10
    else:
        raise ValueError("the calibration covariance is not finite; recollect the calibration statistics")
    linv = torch.linalg.solve_triangular(chol, eye, upper=False)
    w = linear.weight.to(f32)
    p = torch.linalg.solve_triangular(chol, (w @ cov).T, upper=False).T.contiguous()  # W Σ L⁻ᵀ
    mean = stats.mean[order].to(device, f32)
    base = torch.mv(w, mean) + (0 if linear.bias is None else linear.bias.to(f32))
    return _Refit(p, linv, mean, base, cov if keep_cov else None, damping, OrderedDict())


class SlicedLinear(nn.Linear):
    """nn.Linear over a view of another weight: no copy, no initialisation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


@dataclass
class _DenseBlock:
    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    kv_groups_attr: int
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def _permute_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[index.to(linear.weight.device)].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[index.to(linear.bias.device)].contiguous()


def _permute_cols(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, index.to(linear.weight.device)].contiguous()


class PrunableModel:
    def __init__(self, model, scores: list[LayerScores], stats: CalibrationStats | None = None, *,
                 head_mode: str = "per-group", bias_compensation: bool = False, refit: bool = False):
        if bias_compensation and stats is None:
            raise ValueError("bias compensation needs calibration statistics (the channel means)")
        if refit and (stats is None or not stats.has_gram):
            raise ValueError("the refit needs calibration statistics collected with gram=True")
        self.model = model
        self.geometry = geometry_of(model.config)
        self.head_mode = effective_head_mode(self.geometry, head_mode)
        self.bias_compensation = bias_compensation
        self.refit = refit
        self._attn_refit: list[_Refit] = []
        self._mlp_refit: list[_Refit] = []
        self.layers = model.get_decoder().layers
        self._attn_means: list[torch.Tensor | None] = []
        self._mlp_means: list[torch.Tensor | None] = []
        self._dense: list[_DenseBlock] = []
        self._hooks: list = []
        self.plan: PrunePlan | None = None
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                self._sort_block(i, layer, scores[i], stats)

    # -- one-time ordering -------------------------------------------------------
    def _sort_block(self, i: int, layer, scores: LayerScores, stats: CalibrationStats | None) -> None:
        g = self.geometry
        attn, mlp = layer.self_attn, layer.mlp
        hd, G, n_kv = g.head_dim, g.group_size, g.num_kv_heads
        heads = scores.heads.view(n_kv, G)
        if self.head_mode == "per-group":
            within = torch.argsort(heads, dim=1, descending=True, stable=True)  # [n_kv, G]
            head_order = (within + torch.arange(n_kv)[:, None] * G).reshape(-1)
            kv_order = torch.arange(n_kv)
        else:
            kv_order = torch.argsort(heads.sum(1), descending=True, stable=True)
            head_order = (kv_order[:, None] * G + torch.arange(G)[None, :]).reshape(-1)
        q_index = (head_order[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_index = (kv_order[:, None] * hd + torch.arange(hd)).reshape(-1)
        _permute_rows(attn.q_proj, q_index)
        _permute_rows(attn.k_proj, kv_index)
        _permute_rows(attn.v_proj, kv_index)
        _permute_cols(attn.o_proj, q_index)
        channel_order = torch.argsort(scores.channels, descending=True, stable=True)
        _permute_rows(mlp.gate_proj, channel_order)
        _permute_rows(mlp.up_proj, channel_order)
        _permute_cols(mlp.down_proj, channel_order)
        dev, dtype = attn.o_proj.weight.device, attn.o_proj.weight.dtype
        self._attn_means.append(stats.attention[i].mean[q_index].to(dev, dtype) if stats else None)
        self._mlp_means.append(stats.mlp[i].mean[channel_order].to(dev, dtype) if stats else None)
        if self.refit:
            heads_not_prefix = self.head_mode == "per-group" and G > 1
            self._attn_refit.append(_refit_state(stats.attention[i], q_index, attn.o_proj, keep_cov=heads_not_prefix))
            self._mlp_refit.append(_refit_state(stats.mlp[i], channel_order, mlp.down_proj, keep_cov=False))
        self._dense.append(_DenseBlock(attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                       attn.num_key_value_groups, mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    # -- kept index sets -----------------------------------------------------------
    def _kept_q_channels(self, heads_per_group: int, kv_groups: int) -> torch.Tensor:
        """Input channels of o_proj (in sorted order) that a block keeps."""
        g = self.geometry
        hd, G = g.head_dim, g.group_size
        if self.head_mode == "per-group":
            groups = torch.arange(kv_groups)[:, None] * G * hd
            return (groups + torch.arange(heads_per_group * hd)[None, :]).reshape(-1)
        return torch.arange(kv_groups * G * hd)

    def _compensation(self, weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor | int) -> torch.Tensor | None:
        """W[:, pruned] @ mean[pruned]: what the pruned channels added on average.
        `kept` is a prefix length (a view, no copy) or an index of kept columns."""
        if not self.bias_compensation:
            return None
        if isinstance(kept, int):
            if kept >= weight.shape[1]:
                return None
            return torch.mv(weight[:, kept:], mean[kept:])
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        if not removed.any():
            return None
        idx = removed.nonzero().squeeze(1).to(weight.device)
        return torch.mv(weight[:, idx], mean[idx])

    @staticmethod
    def _with_bias(base: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
        if extra is None:
            return base
        return extra if base is None else base + extra

    def _refitted(self, state: _Refit, linear: nn.Linear,
                  kept: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W', b') for the kept input channels (a prefix length or an index), or None
        when nothing is removed (the dense weights stay exact)."""
        width = linear.weight.shape[1]
        if isinstance(kept, torch.Tensor) and torch.equal(kept, torch.arange(kept.numel())):
            kept = kept.numel()  # an index that is a prefix: the cheap path
        if isinstance(kept, int) and kept >= width:
            return None
        key = kept if isinstance(kept, int) else tuple(kept.tolist())
        if key in state.cache:
            state.cache.move_to_end(key)
            return state.cache[key]
        w = linear.weight
        if isinstance(kept, int):
            new_w = state.p[:, :kept] @ state.linv[:kept, :kept]
            kept_mean = state.mean[:kept]
        else:
            assert state.cov is not None, "a kept set that is not a prefix needs the covariance"
            idx = kept.to(w.device)
            sub = state.cov[idx][:, idx]
            chol = torch.linalg.cholesky(sub + state.damping * torch.eye(sub.shape[0], device=w.device, dtype=sub.dtype))
            new_w = torch.cholesky_solve((w.float() @ state.cov[:, idx]).T.contiguous(), chol).T
            kept_mean = state.mean[idx]
        bias = state.base - torch.mv(new_w, kept_mean)
        out = (new_w.to(w.dtype).contiguous(), bias.to(w.dtype))
        state.cache[key] = out
        if len(state.cache) > REFIT_CACHE:
            state.cache.popitem(last=False)
        return out

    # -- apply / restore -----------------------------------------------------------
    @torch.no_grad()
    def apply(self, plan: PrunePlan, mode: str = "slice") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if plan.head_mode != self.head_mode:
            raise ValueError(f"plan uses head mode {plan.head_mode}, the model was sorted for {self.head_mode}")
        self.restore()
        for i, (layer, shape) in enumerate(zip(self.layers, plan.layers)):
            d = self._dense[i]
            kept_q = self._kept_q_channels(shape.heads_per_group, shape.kv_groups)
            kept_c = torch.arange(shape.channels)
            # a prefix of whole groups (kv-group mode) or of channels: compensation over a view
            prefix_q = kept_q.numel() if self.head_mode == "kv-group" else kept_q
            o_fit = down_fit = None
            if self.refit:
                o_fit = self._refitted(self._attn_refit[i], d.o, prefix_q)
                down_fit = self._refitted(self._mlp_refit[i], d.down, shape.channels)
                o_comp = down_comp = None
            else:
                o_comp = self._compensation(d.o.weight, self._attn_means[i], prefix_q)
                down_comp = self._compensation(d.down.weight, self._mlp_means[i], shape.channels)
            if mode == "mask":
                self._mask(d.o, kept_q, o_comp, o_fit)
                self._mask(d.down, kept_c, down_comp, down_fit)
                continue
            self._slice_attention(layer, d, shape, o_comp, o_fit)
            hidden = d.down.weight.shape[0]
            c = shape.channels
            layer.mlp.gate_proj = SlicedLinear(d.gate.weight[:c], None if d.gate.bias is None else d.gate.bias[:c])
            layer.mlp.up_proj = SlicedLinear(d.up.weight[:c], None if d.up.bias is None else d.up.bias[:c])
            if down_fit is not None:
                layer.mlp.down_proj = SlicedLinear(*down_fit)
            else:
                layer.mlp.down_proj = SlicedLinear(d.down.weight[:, :c], self._with_bias(d.down.bias, down_comp))
            assert layer.mlp.down_proj.out_features == hidden
        self.plan = plan

    def _slice_attention(self, layer, d: _DenseBlock, shape, o_comp, o_fit=None) -> None:
        g = self.geometry
        hd, G = g.head_dim, g.group_size
        hpg, kv = shape.heads_per_group, shape.kv_groups
        o_bias = o_fit[1] if o_fit is not None else self._with_bias(d.o.bias, o_comp)
        if hpg * kv == 0:
            empty = EmptyAttention(g.hidden_size, hd, d.attn.layer_idx, bias=o_bias is not None,
                                   dtype=d.o.weight.dtype, device=d.o.weight.device)
            if o_bias is not None:
                empty.o_proj.bias.copy_(o_bias)
            layer.self_attn = empty
            return
        if self.head_mode == "per-group" and hpg < G:
            # kept query heads are the first hpg of every group: one gather (a copy)
            q_w = d.q.weight.view(kv, G * hd, -1)[:, : hpg * hd].reshape(kv * hpg * hd, -1)
            q_b = None if d.q.bias is None else d.q.bias.view(kv, G * hd)[:, : hpg * hd].reshape(-1)
            o_w = d.o.weight.view(-1, kv, G * hd)[:, :, : hpg * hd].reshape(-1, kv * hpg * hd)
        else:  # a prefix of whole groups: pure views
            n = kv * hpg * hd
            q_w, q_b = d.q.weight[:n], None if d.q.bias is None else d.q.bias[:n]
            o_w = d.o.weight[:, :n]
        m = kv * hd
        d.attn.q_proj = SlicedLinear(q_w, q_b)
        d.attn.k_proj = SlicedLinear(d.k.weight[:m], None if d.k.bias is None else d.k.bias[:m])
        d.attn.v_proj = SlicedLinear(d.v.weight[:m], None if d.v.bias is None else d.v.bias[:m])
        d.attn.o_proj = SlicedLinear(o_w if o_fit is None else o_fit[0], o_bias)
        d.attn.num_key_value_groups = hpg

    def _mask(self, linear: nn.Linear, kept: torch.Tensor, comp: torch.Tensor | None,
              fit: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        mask = torch.zeros(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
        mask[kept.to(mask.device)] = 1
        self._hooks.append(linear.register_forward_pre_hook(lambda mod, args: (args[0] * mask,)))
        if fit is not None:  # the refitted columns in place of the kept ones, zeros elsewhere
            full = torch.zeros_like(linear.weight)
            full[:, kept.to(full.device)] = fit[0]
            self._hooks.append(linear.register_forward_hook(lambda mod, args, out: F.linear(args[0], full, fit[1])))
        elif comp is not None:
            self._hooks.append(linear.register_forward_hook(lambda mod, args, out: out + comp))

    def restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer, d in zip(self.layers, self._dense):
            layer.self_attn = d.attn
            d.attn.q_proj, d.attn.k_proj, d.attn.v_proj, d.attn.o_proj = d.q, d.k, d.v, d.o
            d.attn.num_key_value_groups = d.kv_groups_attr
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj = d.gate, d.up, d.down
        self.plan = None

    def block_shapes(self) -> list[dict]:
        """Per-block sizes and bias flags of the applied plan, as the exported config holds them."""
        assert self.plan is not None, "apply a plan first"
        out = []
        for layer, shape in zip(self.layers, self.plan.layers):
            attn = layer.self_attn
            out.append({
                "heads_per_group": shape.heads_per_group,
                "kv_groups": shape.kv_groups,
                "channels": shape.channels,
                "o_proj_bias": attn.o_proj.bias is not None,
                "down_proj_bias": layer.mlp.down_proj.bias is not None,
            })
        return out
