"""A PyTorch re-implementation of the reference A3 code's training forward, for timing only.

It follows the reference semantics and costs as docs/method.md (last section) describes them: dense B x L x L float
masks for both streams, K/V repeated for GQA, two separate attention passes per layer, the
post-norm 'official' block, and the Python double loop that builds the unused target mapping on
every forward. Written here from the description (not copied); bench/ may import torch, a3jax may not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class RefA3(torch.nn.Module):
    def __init__(self, vocab, hidden, layers, heads, kv_heads, mlp):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, hidden // heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.query_embed = torch.nn.Parameter(torch.randn(1, 1, hidden))
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            m = torch.nn.Module()
            m.q = torch.nn.Linear(hidden, heads * self.d, bias=False)
            m.k = torch.nn.Linear(hidden, kv_heads * self.d, bias=False)
            m.v = torch.nn.Linear(hidden, kv_heads * self.d, bias=False)
            m.o = torch.nn.Linear(heads * self.d, hidden, bias=False)
            m.gate = torch.nn.Linear(hidden, mlp, bias=False)
            m.up = torch.nn.Linear(hidden, mlp, bias=False)
            m.down = torch.nn.Linear(mlp, hidden, bias=False)
            m.n1 = torch.nn.Parameter(torch.ones(hidden))
            m.n2 = torch.nn.Parameter(torch.ones(hidden))
            self.layers.append(m)
        self.norm = torch.nn.Parameter(torch.ones(hidden))
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, groups):
        b, t = tokens.shape
        gi, gj = groups[:, :, None], groups[:, None, :]
        zero, ninf = torch.tensor(0.0), torch.tensor(float("-inf"))
        cmask = torch.where(gi >= gj, zero, ninf)[:, None]
        qmask = torch.where(gi > gj, zero, ninf)[:, None]
        target_mapping = torch.zeros(b, t, t)  # built and never used, as in the reference
        for r in range(b):
            for i in range(t):
                target_mapping[r, i, groups[r, i]] = 1.0
        pos = torch.arange(t, dtype=torch.float32)
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2).float() / self.d))
        emb = torch.cat([pos[:, None] * inv] * 2, -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        hc = self.embed(tokens)
        hq = self.query_embed.expand(b, t, -1)
        for m in self.layers:
            xc = rms(hc, m.n1)
            k = rope(m.k(xc).view(b, t, self.kv, self.d).transpose(1, 2), cos, sin)
            v = m.v(xc).view(b, t, self.kv, self.d).transpose(1, 2)
            k = k.repeat_interleave(self.h // self.kv, 1)
            v = v.repeat_interleave(self.h // self.kv, 1)
            outs = []
            for h, mask in ((hc, cmask), (hq, qmask)):
                q = rope(m.q(rms(h, m.n1)).view(b, t, self.h, self.d).transpose(1, 2), cos, sin)
                s = q @ k.transpose(-1, -2) / math.sqrt(self.d) + mask
                p = torch.nan_to_num(torch.softmax(s, -1))  # fully masked rows -> zeros
                a = m.o((p @ v).transpose(1, 2).reshape(b, t, -1))
                vv = rms(h + a, m.n2)
                outs.append(vv + m.down(F.silu(m.gate(vv)) * m.up(vv)))
            hc, hq = outs
        return self.lm_head(rms(hq, self.norm))
