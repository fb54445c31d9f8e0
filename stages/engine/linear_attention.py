"""Jet-Nemotron's linear-attention block (JetBlock) in pure torch: a gated delta rule with a dynamic
causal convolution on the values, usable as the self-attention of a layer of our GPTModel.

    q = l2norm(SiLU(Wq x)), k = l2norm(SiLU(Wk x)), v = SiLU(dynconv(Wv x; kernels = MLP(x)))
    beta = sigmoid(Wb x), g = log alpha = -exp(A_log) * softplus(Wa x + dt_bias)
    S_t = alpha_t S_{t-1} + k_t beta_t (v_t - alpha_t S_{t-1}^T k_t)^T,   o_t = S_t^T q_t / sqrt(dk)
    out = Wo (RMSNorm(o) * SiLU(Wg x))

(arXiv 2508.15884; state S is [key dim, value dim] per head, as megatron's and fla's kernels keep
it.) Heads follow the attention it replaces: queries have num_attention_heads heads, keys and
values num_query_groups heads shared by the query heads of a group (as GQA shares them), each of
the attention's head dim, so a block can be initialised from that attention's weights
(`init_from_attention`).

Why not megatron-core's GatedDeltaNet: it needs TransformerEngine, `fla` and CUDA and refuses
inference. Why our own chunked kernel beside megatron's pure-torch `torch_chunk_gated_delta_rule`
(which tests/test_linear_attention.py checks it against): megatron's inverts each chunk's
triangular system with a Python loop over the chunk's rows (64 small kernels per chunk, and as
many autograd nodes); ours is one `torch.linalg.solve_triangular`. Measured forward+backward, b=4,
t=256, 4 heads, dim 32, 2 threads on a shared machine (load 12): megatron's 12.3 s, ours 7.9 s.

Generation: the block keeps (recurrent state, conv cache) in the inference context's
`key_value_memory_dict[layer_number]`, the slot megatron's attention keeps its KV cache in, and
starts afresh when the context's `sequence_len_offset` is 0; so megatron's static inference path
(what stages.engine.generate runs for a model its KV fast path does not cover) steps it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# JetBlock's sizes, there because num_params counts them
from stages.configs.model import LINEAR_CONV_KERNEL as CONV_KERNEL
from stages.configs.model import LINEAR_GENERATOR_REDUCTION as GENERATOR_REDUCTION

CHUNK = 64


def recurrent_gated_delta_rule(q, k, v, g, beta, state=None, scale=None):
    """The gated delta rule one position at a time (the definition; used to decode).

    q, k [b, t, H, dk] (L2-normalised), v [b, t, H, dv], g (log decay) and beta [b, t, H];
    state [b, H, dk, dv] or None (zeros). Returns (o [b, t, H, dv], final state), in fp32.
    """
    b, t, heads, dk = k.shape
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    s = q.new_zeros(b, heads, dk, v.shape[-1]) if state is None else state.float()
    out = []
    for i in range(t):
        s = s * g[:, i].exp()[..., None, None]
        kt = k[:, i]  # [b, H, dk]
        u = beta[:, i, :, None] * (v[:, i] - torch.einsum("bhkv,bhk->bhv", s, kt))
        s = s + kt[..., None] * u[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", s, q[:, i] * scale))
    return torch.stack(out, 1), s


def chunk_gated_delta_rule(q, k, v, g, beta, state=None, scale=None, chunk: int = CHUNK):
    """The same rule over chunks of `chunk` positions (WY form: within a chunk the delta updates
    are one triangular solve; across chunks the state carries). Same arguments and result as
    `recurrent_gated_delta_rule`."""
    b, t, heads, dk = k.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    pad = (-t) % chunk
    # [b, H, n, C, d] in fp32; padded positions have k = v = beta = g = 0, so they change nothing
    q, k, v = (F.pad(x.float().transpose(1, 2), (0, 0, 0, pad)).reshape(b, heads, -1, chunk,
                                                                          x.shape[-1])
               for x in (q, k, v))
    g, beta = (F.pad(x.float().transpose(1, 2), (0, pad)).reshape(b, heads, -1, chunk)
               for x in (g, beta))
    gc = g.cumsum(-1)  # log decay from the chunk start, inclusive
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    diff = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = diff.exp()  # decay[i, j] = alpha_{j+1} ... alpha_i for j <= i, else 0
    kb = k * beta[..., None]
    # (I + A) W = B with A strictly lower: A[i, j] = beta_i k_i.k_j decay[i, j]
    a = (kb @ k.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(chunk, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * gc.exp()[..., None]], -1)
    sol = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :dv], sol[..., dv:]
    s = q.new_zeros(b, heads, dk, dv) if state is None else state.float()
    intra = (q @ k.transpose(-1, -2) * decay) * scale
    out = []
    for n in range(q.shape[2]):
        v_new = u[:, :, n] - w[:, :, n] @ s  # the chunk's values less what the state predicts
        o = (q[:, :, n] * gc[:, :, n, :, None].exp() * scale) @ s + intra[:, :, n] @ v_new
        out.append(o)
        last = gc[:, :, n, -1]
        k_tail = k[:, :, n] * (last[..., None] - gc[:, :, n]).exp()[..., None]
        s = s * last.exp()[..., None, None] + k_tail.transpose(-1, -2) @ v_new
    o = torch.stack(out, 2).reshape(b, heads, -1, dv)[:, :, :t]
    return o.transpose(1, 2), s


def dynamic_causal_conv(x, kernels, cache=None):
    """Depthwise causal convolution with a kernel per position and channel.

    x [b, t, D], kernels [b, t, D, W] (tap W-1 weighs the current position), cache [b, W-1, D]:
    the inputs before x (zeros when None). Returns (out [b, t, D], the new cache [b, W-1, D]).
    """
    w = kernels.shape[-1]
    past = x.new_zeros(x.shape[0], w - 1, x.shape[2]) if cache is None else cache.to(x.dtype)
    full = torch.cat([past, x], 1)  # [b, W-1+t, D]
    windows = full.unfold(1, w, 1)  # [b, t, D, W]: positions t-W+1 .. t
    return (windows * kernels).sum(-1), full[:, -(w - 1):]


def _plain_causal(mask: torch.Tensor) -> bool:
    """Whether a megatron attention mask [b|1, 1, s, s] (True = masked) is the causal one."""
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return mask.shape[-2] == n and bool((mask.bool() == causal).all())


class JetBlock(nn.Module):
    """A layer's self-attention replaced by JetBlock: built by megatron from a ModuleSpec with the
    layer's config, returns (output [s, b, h], None) like megatron's attention."""

    def __init__(self, config, layer_number: int, **unused):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        if config.tensor_model_parallel_size != 1 or config.sequence_parallel:
            raise ValueError("parallel.tensor: linear-attention layers run unsharded; set it to 1")
        h = config.hidden_size
        self.heads, self.groups = config.num_attention_heads, config.num_query_groups
        self.head_dim = config.kv_channels
        qd, kvd = self.heads * self.head_dim, self.groups * self.head_dim
        self.q_proj, self.k_proj = nn.Linear(h, qd, bias=False), nn.Linear(h, kvd, bias=False)
        self.v_proj, self.g_proj = nn.Linear(h, kvd, bias=False), nn.Linear(h, qd, bias=False)
        self.b_proj = nn.Linear(h, self.heads, bias=False)
        self.a_proj = nn.Linear(h, self.heads, bias=False)
        self.o_proj = nn.Linear(qd, h, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.out_norm = nn.RMSNorm(self.head_dim, eps=config.layernorm_epsilon)
        hidden = max(h // GENERATOR_REDUCTION, 1)
        self.conv_w1 = nn.Linear(h, hidden, bias=False)
        self.conv_w2 = nn.Linear(hidden, kvd * CONV_KERNEL, bias=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.b_proj, self.a_proj):
            self.config.init_method(lin.weight)
        self.config.output_layer_init_method(self.o_proj.weight)
        # decay rates and time steps spread as Mamba2 / GatedDeltaNet initialise them
        self.A_log.copy_(torch.empty(self.heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(self.heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # JetBlock zero-initialises the generator; its output bias is the static kernel, here the
        # identity (current position only), so a fresh block sees v = SiLU(Wv x)
        self.conv_w1.weight.zero_()
        self.conv_w2.weight.zero_()
        self.conv_w2.bias.copy_(torch.nn.functional.one_hot(
            torch.full((self.conv_w2.bias.numel() // CONV_KERNEL,), CONV_KERNEL - 1),
            CONV_KERNEL).flatten().float())

    def forward(self, hidden_states, attention_mask=None, inference_context=None, **unused):
        """hidden_states [s, b, h] -> (out [s, b, h], None). Causal by construction: the mask is
        not read (packed sequences would see each other through the state)."""
        if attention_mask is not None and not _plain_causal(attention_mask):
            raise ValueError("packing: a linear-attention layer would carry one packed sample's "
                             "state into the next; set packing: false")
        x = hidden_states.transpose(0, 1)  # [b, s, h]
        state = None
        ctx = inference_context
        if ctx is not None and ctx.sequence_len_offset > 0:
            state = ctx.key_value_memory_dict[self.layer_number]
        out, new_state = self.mix(x, state)
        if ctx is not None:
            ctx.key_value_memory_dict[self.layer_number] = new_state
        return out.transpose(0, 1).contiguous(), None

    def mix(self, x, state=None, valid=None):
        """x [b, s, h]; state (recurrent [b, H, dk, dv], conv cache [b, W-1, kv dim]) or None.
        Returns (out [b, s, h], new state). One position: the recurrence; more: the chunks.
        valid [b, s] (bool, optional): False at left padding, which then leaves the state as it
        is (no write, no decay) and enters the convolution as zeros, as before a sequence start."""
        b, s, _ = x.shape
        rec, conv = state if state is not None else (None, None)
        kernels = self.conv_w2(F.silu(self.conv_w1(x))).view(b, s, -1, CONV_KERNEL)
        v_in = self.v_proj(x)
        keep = None if valid is None else valid[..., None].to(v_in.dtype)  # [b, s, 1]
        if keep is not None:
            v_in = v_in * keep
        v, conv = dynamic_causal_conv(v_in, kernels, conv)
        rep = self.heads // self.groups
        q = F.normalize(F.silu(self.q_proj(x)).view(b, s, self.heads, -1), dim=-1, eps=1e-6)
        k = F.normalize(F.silu(self.k_proj(x)).view(b, s, self.groups, -1), dim=-1, eps=1e-6)
        v = F.silu(v).view(b, s, self.groups, -1)
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        if keep is not None:
            beta, g = beta * keep.float(), g * keep.float()
        rule = recurrent_gated_delta_rule if s == 1 else chunk_gated_delta_rule
        o, rec = rule(q, k, v, g, beta, rec)
        o = self.out_norm(o.to(x.dtype)) * F.silu(self.g_proj(x).view(b, s, self.heads, -1))
        return self.o_proj(o.reshape(b, s, -1)), (rec, conv)

    @torch.no_grad()
    def init_from_attention(self, attention) -> None:
        """Take q, k, v and output projections from megatron's SelfAttention of the same layer
        (its fused linear_qkv holds, per query group, that group's query heads, its key, its
        value)."""
        d, rep = self.head_dim, self.heads // self.groups
        w = attention.linear_qkv.weight.view(self.groups, (rep + 2) * d, -1)
        self.q_proj.weight.copy_(w[:, :rep * d].reshape(-1, w.shape[-1]))
        self.k_proj.weight.copy_(w[:, rep * d:(rep + 1) * d].reshape(-1, w.shape[-1]))
        self.v_proj.weight.copy_(w[:, (rep + 1) * d:].reshape(-1, w.shape[-1]))
        self.o_proj.weight.copy_(attention.linear_proj.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Every tensor whole and replicated (the block is never sharded)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True),
                                                   prefix, sharded_offsets=sharded_offsets)
