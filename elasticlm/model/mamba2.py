"""Mamba-2 mixer: chunked SSD scan for training/prefill, recurrent step for decoding.

Layout of ``in_proj`` outputs (transformers' NemotronH, DESIGN 2.1)::

    [ z: heads·head_dim | x: heads·head_dim | B: groups·state | C: groups·state | dt: heads ]

The conv1d runs over ``[x | B | C]``. Head ``h`` reads B/C group ``h // heads_per_group``.
A sub-model keeps the first ``heads_per_group`` heads of *every* group and the first
``head_dim`` channels of every kept head; B, C, the group count and the state size are
never sliced. The gated norm normalises per group, over the kept channels of that group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..int8 import linear, tensors
from ..kinds import MAMBA_KIND, MambaWidth, slice_params
from .cache import MambaState
from .call import PLAIN, MixerCall
from .documents import RESET_LOG_DECAY, DocumentMask
from .norm import gated_group_rms_norm
from .tap import Tap


class Mamba2Mixer(nn.Module):

    def __init__(self, config: ModelConfig, full: MambaWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.full = config, full  # what the layout of every parameter follows from (kinds/mamba.py)
        self.n_groups = config.mamba.n_groups
        self.num_heads, self.head_dim = full.heads_per_group * self.n_groups, full.head_dim
        self.state_size, self.conv_kernel = config.mamba.state_size, config.mamba.conv_kernel
        self.chunk_size = config.mamba.chunk_size
        self.time_step_min, self.norm_eps = config.mamba.time_step_min, config.norm_eps
        limit = config.mamba.time_step_limit or (config.mamba.time_step_min, math.inf)
        # softplus(dt) is clamped to [dt_low, dt_high] (dt_high None: no upper clamp)
        self.dt_low, self.dt_high = float(limit[0]), (float(limit[1]) if math.isfinite(limit[1]) else None)
        kw = dict(device=device, dtype=dtype)
        shapes = {name: tuple(d.full_size for d in dims)
                  for name, dims in MAMBA_KIND.layout(config, full, full, config.hidden_size).items()}
        self.in_proj = nn.Linear(*shapes["in_proj.weight"][::-1], bias=config.mamba.use_bias, **kw)
        conv_dim = shapes["conv1d.weight"][0]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.mamba.conv_kernel, groups=conv_dim,
                                padding=config.mamba.conv_kernel - 1, bias=config.mamba.use_conv_bias, **kw)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, **kw))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, **kw))
        self.D = nn.Parameter(torch.empty(self.num_heads, **kw))
        self.norm = NormWeight(shapes["norm.weight"][0], **kw)
        self.out_proj = nn.Linear(*shapes["out_proj.weight"][::-1], bias=config.mamba.use_bias, **kw)
        self.tap = Tap()  # the x channels before the conv (importance hooks it)

    # -- slicing ----------------------------------------------------------------------------
    def sliced(self, hidden: int, width: MambaWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters for the sub-model, keyed like its own state_dict.

        Views when the head widths are full; otherwise copies of the kept rows (whoever decodes keeps them,
        see :class:`~elasticlm.model.slicing.SliceMemo`).
        """
        if width == self.full and hidden == self.out_proj.out_features:
            return self._full_params()
        return slice_params(self._full_params(), MAMBA_KIND.layout(self.config, self.full, width, hidden))

    def _full_params(self) -> dict[str, torch.Tensor]:
        return tensors(self)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, width: MambaWidth, call: MixerCall = PLAIN) -> torch.Tensor:
        """The block's call: :meth:`compute` with this layer's state in ``call.cache`` (read and replaced)."""
        cache = call.cache
        if cache is None:
            return self.compute(u, width, None, documents=call.documents, inner=call.inner, params=call.params)[0]
        out, cache.layers[call.layer] = self.compute(u, width, cache.layers[call.layer], new_state=True,
                                                     documents=call.documents, inner=call.inner, params=call.params,
                                                     valid=cache.chunk_valid)
        return out

    def compute(self, u: torch.Tensor, width: MambaWidth, state: MambaState | None = None,
                new_state: bool = False, documents: DocumentMask | None = None,
                inner: torch.Tensor | None = None, params: dict[str, torch.Tensor] | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaState | None]:
        """``u``: [batch, seq, hidden]. With ``state`` (or ``new_state``) returns the state after
        the last token; ``state`` may hold a previous prefix (continued prefill) or be decoded one
        token at a time. ``documents`` keeps packed documents apart (training; no state). ``inner``
        ([heads·head_dim], head-major) masks the channels inside the gated norm (soft masks).
        ``valid`` [batch, seq] (left-padded ragged batches): padding enters neither the conv window nor the
        state, so each row's state is the one of its prompt alone."""
        b, t, _ = u.shape
        prm = params if params is not None else self.sliced(u.shape[-1], width)  # params: sliced() made earlier
        if state is not None and t == 1 and valid is None:
            return self._step(u, prm, width, state)
        g, n, k = self.n_groups, self.state_size, self.conv_kernel
        heads, hd = g * width.heads_per_group, width.head_dim
        d_inner = heads * hd

        zxbcdt = linear(u, prm["in_proj.weight"], prm.get("in_proj.bias"))
        z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * g * n, heads], dim=-1)
        if self.tap.watched:
            self.tap(xbc[..., :d_inner])  # the x part, before the conv

        conv_w, conv_b = prm["conv1d.weight"], prm.get("conv1d.bias")
        if valid is not None:  # padding: zero conv inputs (as before a sequence starts)
            xbc = torch.where(valid[..., None], xbc, 0.0)
        xbc = xbc.transpose(1, 2)  # [b, channels, t]
        track = state is not None or new_state
        if state is not None:
            window = torch.cat([state.conv, xbc], dim=-1)
            conv_out = F.conv1d(window, conv_w, conv_b, groups=window.shape[1])
        elif documents is not None:
            window = F.pad(xbc, (k - 1, 0))
            conv_out = document_causal_conv(window, conv_w, conv_b, documents.conv_keep)
        else:
            window = F.pad(xbc, (k - 1, 0)) if track else xbc
            conv_out = F.conv1d(xbc, conv_w, conv_b, padding=k - 1, groups=xbc.shape[1])[..., :t]
        conv_state = window[..., window.shape[-1] - (k - 1):] if track else None
        xbc = F.silu(conv_out).transpose(1, 2)
        x, B, C = xbc.split([d_inner, g * n, g * n], dim=-1)
        if valid is not None:  # ...and no input to the state (it stays zero until the prompt begins)
            x = torch.where(valid[..., None], x, 0.0)

        A = -torch.exp(prm["A_log"].float())
        dt = F.softplus(dt.float() + prm["dt_bias"].float()).clamp(min=self.dt_low, max=self.dt_high)
        x = x.reshape(b, t, heads, hd)
        B, C = B.reshape(b, t, g, n), C.reshape(b, t, g, n)
        init = state.ssm if state is not None else None
        reset = documents.reset if documents is not None else None
        y, ssm = ssd_chunked(x, dt, A, B, C, scan_chunk_size(self.chunk_size, u.device), init, reset)
        y = y + x.float() * prm["D"].float()[:, None]
        # soft masks go inside the norm, so that its statistics count the kept channels only
        y = gated_group_rms_norm(y.reshape(b, t, d_inner), z, prm["norm.weight"], g, self.norm_eps, mask=inner)
        out = linear(y.to(u.dtype), prm["out_proj.weight"], prm.get("out_proj.bias"))
        return out, (MambaState(conv_state, ssm) if track else None)

    def _step(self, u: torch.Tensor, prm: dict[str, torch.Tensor], width: MambaWidth,
              state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One decoding step, written for few kernel launches (decode is overhead-bound)."""
        b = u.shape[0]
        g, n = self.n_groups, self.state_size
        hg, hd = width.heads_per_group, width.head_dim
        d_inner = g * hg * hd
        zxbcdt = linear(u.view(b, -1), prm["in_proj.weight"], prm.get("in_proj.bias"))
        z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * g * n, g * hg], dim=-1)
        window = torch.cat([state.conv, xbc[:, :, None]], dim=-1)  # [b, channels, kernel]
        xbc = torch.linalg.vecdot(window, prm["conv1d.weight"][:, 0])
        if "conv1d.bias" in prm:
            xbc = xbc + prm["conv1d.bias"]
        x, B, C = F.silu(xbc).split([d_inner, g * n, g * n], dim=-1)
        dt = F.softplus(dt.float() + prm["dt_bias"].float()).clamp_(min=self.dt_low, max=self.dt_high)
        decay = (dt * prm["A_log"].float().exp()).neg_().exp_().view(b, g, hg, 1, 1)
        x = x.float().view(b, g, hg, hd, 1)
        ssm = torch.addcmul(state.ssm.view(b, g, hg, hd, n) * decay, x * dt.view(b, g, hg, 1, 1),
                            B.float().view(b, g, 1, 1, n))
        y = torch.addcmul(torch.linalg.vecdot(ssm, C.float().view(b, g, 1, 1, n)), x[..., 0],
                          prm["D"].float().view(g, hg, 1))
        h = (y * F.silu(z.float()).view(b, g, hg, hd)).view(b, g, hg * hd)
        h = prm["norm.weight"] * F.rms_norm(h, (hg * hd,), None, self.norm_eps).view(b, d_inner)
        out = linear(h.to(u.dtype), prm["out_proj.weight"], prm.get("out_proj.bias"))
        return out.view(b, 1, -1), MambaState(window[..., 1:], ssm.view(b, g * hg, hd, n))

    @torch.no_grad()
    def init_kind_parameters(self) -> None:
        """After the generic init (HybridLM.init_weights): Mamba-2's SSM init, and ``out_proj`` scaled by
        1/sqrt(layers) as transformers does for the residual outputs of Mamba layers."""
        self.init_ssm_parameters(self.config.mamba.time_step_max)
        self.out_proj.weight.mul_(1 / math.sqrt(self.config.num_layers))
        self.norm.weight.fill_(1.0)

    @torch.no_grad()
    def init_ssm_parameters(self, time_step_max: float) -> None:
        """Mamba-2's standard init: A = 1..heads, D = 1, dt log-uniform in [dt_min, dt_max]."""
        h = self.num_heads
        self.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(self.time_step_min), math.log(time_step_max)
        dt = torch.exp(torch.rand(h) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class NormWeight(nn.Module):
    """Holds the gated norm's weight under the name ``norm.weight`` (checkpoint compatibility)."""

    def __init__(self, size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))


# -- the SSD scan ----------------------------------------------------------------------------


def scan_chunk_size(config_chunk: int, device: torch.device) -> int:
    """The tile the chunked scan runs with. Any tile gives the same result (up to rounding);
    on CPU the per-head ``[chunk, chunk]`` decay tensors dominate above 32, so smaller tiles are
    faster there (bench/bench_scan_chunk.py); elsewhere the config's value is kept."""
    return min(config_chunk, 32) if device.type == "cpu" else config_chunk



def document_causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         keep: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv1d whose taps stop at document starts.

    ``window`` [b, c, k-1+t] (zero-padded on the left), ``weight`` [c, 1, k],
    ``keep`` [b, k, t]: ``keep[:, j, s]`` is 1 when token ``s - j`` is in the same document as ``s``.
    """
    k, t = weight.shape[-1], keep.shape[-1]
    out = window[..., k - 1:] * weight[:, 0, k - 1, None]  # the token itself (tap k-1) always counts
    for j in range(1, k):
        out = out + window[..., k - 1 - j: k - 1 - j + t] * weight[:, 0, k - 1 - j, None] * keep[:, None, j]
    return out if bias is None else out + bias[:, None]


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-space-duality scan, in fp32, for any sequence length.

    x [b, t, heads, p]; dt [b, t, heads] (after softplus); A [heads] (negative);
    B, C [b, t, groups, n]; initial_state [b, heads, p, n] or None; reset [b, t] bool or None:
    the state restarts at these tokens (their decay of the incoming state is exp(RESET_LOG_DECAY)).
    Returns y [b, t, heads, p] (without the D skip) and the final state [b, heads, p, n].

    Everything runs in the layout ``[b, groups, heads_per_group, chunks, positions, ·]`` so that
    every contraction is a plain batched matmul (no hidden copies), and ``C·Bᵀ`` is computed
    once per group rather than once per head. Padding the tail with dt = 0 leaves the final
    state untouched (decay exp(0) = 1, input x·dt = 0).
    """
    b, t, heads, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = heads // g
    l = min(chunk_size, t)
    pad = (-t) % l
    nc = (t + pad) // l
    xdt = x.float() * dt[..., None]
    a = dt * A  # [b, t, heads]
    if reset is not None:
        a = a.masked_fill(reset[..., None], RESET_LOG_DECAY)
    B, C = B.float(), C.float()
    if pad:
        xdt, a = F.pad(xdt, (0, 0, 0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    xdt = xdt.view(b, nc, l, g, hg, p).permute(0, 3, 4, 1, 2, 5)  # [b, g, hg, c, l, p]
    a_cs = a.view(b, nc, l, g, hg).permute(0, 3, 4, 1, 2).cumsum(dim=-1)  # [b, g, hg, c, l]
    B = B.view(b, nc, l, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, l, n]
    C = C.view(b, nc, l, g, n).permute(0, 3, 1, 2, 4)

    # 1. within each chunk: y_l = Σ_{s≤l} (C_l·B_s) exp(a_cs[l] − a_cs[s]) x_s dt_s
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((a_cs[..., :, None] - a_cs[..., None, :]).masked_fill(~causal, -math.inf))
    cb = (C @ B.transpose(-1, -2))[:, :, None]  # [b, g, 1, c, l, s], shared by the group's heads
    y = (decay * cb) @ xdt  # [b, g, hg, c, l, p]

    # 2. each chunk's own end state, 3. carried across chunks, 4. read out within the next chunk
    decay_to_end = torch.exp(a_cs[..., -1:] - a_cs)  # [b, g, hg, c, l]
    chunk_states = xdt.transpose(-1, -2) @ (B[:, :, None] * decay_to_end[..., None])  # [b, g, hg, c, p, n]
    if initial_state is None:
        start = torch.zeros(b, g, hg, 1, p, n, device=x.device, dtype=torch.float32)
    else:
        start = initial_state.float().view(b, g, hg, 1, p, n)
    states = torch.cat([start, chunk_states], dim=3)  # [b, g, hg, c+1, p, n]
    a_end_cs = F.pad(a_cs[..., -1], (1, 0)).cumsum(dim=-1)  # [b, g, hg, c+1]
    causal_c = torch.ones(nc + 1, nc + 1, dtype=torch.bool, device=x.device).tril()
    carry = torch.exp((a_end_cs[..., :, None] - a_end_cs[..., None, :]).masked_fill(~causal_c, -math.inf))
    states = (carry @ states.flatten(-2)).view(b, g, hg, nc + 1, p, n)  # state at each chunk start
    final = states[:, :, :, -1]
    y_off = (C[:, :, None] @ states[:, :, :, :-1].transpose(-1, -2)) * torch.exp(a_cs)[..., None]
    y = (y + y_off).permute(0, 3, 4, 1, 2, 5).reshape(b, nc * l, heads, p)[:, :t]
    return y, final.reshape(b, heads, p, n)
