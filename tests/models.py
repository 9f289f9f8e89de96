"""Small models for backend tests: a toy DiT and a tiny diffusers Wan transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SelfAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int, mode: str = "plain"):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.to_qkv = torch.nn.Linear(dim, 3 * dim)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x, context=None):
        b, s, d = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.mode == "plain":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "positional":
            out = F.scaled_dot_product_attention(q, k, v, None, 0.0, False)
        elif self.mode == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "masked":
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.mode == "cross":
            kc = context.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, kc, kc)
        elif self.mode == "twice":
            out = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, v, k)
        else:
            raise ValueError(self.mode)
        return self.to_out(out.transpose(1, 2).reshape(b, s, d))


class ToyDiT(torch.nn.Module):
    """Residual stack of attention layers; ``modes`` picks each layer's SDPA variant."""

    def __init__(self, dim: int = 32, heads: int = 2, modes=("plain", "plain")):
        super().__init__()
        self.blocks = torch.nn.ModuleList(SelfAttention(dim, heads, m) for m in modes)

    def forward(self, x, context=None):
        for block in self.blocks:
            x = x + block(x, context)
        return x


def tiny_wan(num_layers: int = 3, heads: int = 2, head_dim: int = 16, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
        num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


def wan_inputs(frames=3, height=8, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, frames, height, width, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
    )


def random_block_masks(keys, heads, n_blocks, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key in keys:
        mask = torch.rand(heads, n_blocks, n_blocks, generator=g) < density
        mask |= torch.eye(n_blocks, dtype=torch.bool)  # keep every row non-empty
        masks[key] = mask
    return masks
