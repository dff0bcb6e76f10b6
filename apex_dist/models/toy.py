"""A small MLP velocity model on 2-D points that honours the velocity-model interface.

`model(x_t, t, tt, text, text_mask, fake_rows) -> F` exactly as the 20B MMDiT: the class
embedding plays the text tokens, goes through a text input projection, and the condition shift
of fake rows is applied right after it (method.md section 2). Its time embeddings carry the
names every backbone uses (`time_text_embed` = E1, `time_text_embed_2` = E2; see
`apex_dist.models.conditioning`). Its spec is `apex_dist.models.specs.toy`.
"""

from __future__ import annotations

from torch import Tensor, nn

from apex_dist.models.conditioning import (
    DEFAULT_CONDITION_SHIFT,
    ConditionShift,
    combine_time_embeddings,
    sinusoidal_embedding,
)

# Width of the sinusoidal features fed to the time MLP.
TIME_FEATURES = 64


class TimeEmbedder(nn.Module):
    """Sinusoidal features of 1000*t followed by a two-layer MLP (the pretrained E1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FEATURES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, TIME_FEATURES))


class ModulatedBlock(nn.Module):
    """Residual MLP block whose LayerNorm is modulated (shift, scale, gate) by the condition."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.modulation = nn.Linear(hidden_size, 3 * hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.SiLU(),
            nn.Linear(2 * hidden_size, hidden_size),
        )

    def forward(self, hidden: Tensor, condition: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(nn.functional.silu(condition)).chunk(3, dim=-1)
        return hidden + gate * self.mlp(self.norm(hidden) * (1 + scale) + shift)


class ToyVelocityModel(nn.Module):
    """MLP velocity model for points of `data_dim` dimensions conditioned on "text" tokens.

    Args:
        data_dim: dimension of the points (2 in the toy problem).
        text_dim: width of the text features (the class embedding).
        hidden_size: width of the network.
        num_blocks: number of modulated residual blocks.
        shift_scale, shift_bias, shift_learnable: the condition shift of fake rows.
    """

    def __init__(
        self,
        data_dim: int = 2,
        text_dim: int = 16,
        hidden_size: int = 256,
        num_blocks: int = 4,
        shift_scale: float = DEFAULT_CONDITION_SHIFT.scale,
        shift_bias: float = DEFAULT_CONDITION_SHIFT.bias,
        shift_learnable: bool = DEFAULT_CONDITION_SHIFT.learnable,
    ):
        super().__init__()
        self.data_dim = data_dim
        self.text_input = nn.Linear(text_dim, hidden_size)  # the "text input projection"
        self.condition_shift = ConditionShift(shift_scale, shift_bias, shift_learnable)
        self.time_text_embed = TimeEmbedder(hidden_size)  # E1, pretrained
        self.input = nn.Linear(data_dim, hidden_size)
        self.blocks = nn.ModuleList(ModulatedBlock(hidden_size) for _ in range(num_blocks))
        self.output_norm = nn.LayerNorm(hidden_size)
        self.output = nn.Linear(hidden_size, data_dim)
        # E2: built last, so that the other weights are those of the model without it; its
        # random values are replaced by E1's (conditioning.init_apex_weights)
        self.time_text_embed_2 = TimeEmbedder(hidden_size)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        target_time: Tensor,
        text: Tensor,
        text_mask: Tensor,
        fake_rows: Tensor | None = None,
    ) -> Tensor:
        """x_t (B, data_dim), t and tt (B,), text (B, S, text_dim), text_mask (B, S) bool,
        fake_rows (B,) bool -> velocity (B, data_dim)."""
        tokens = self.condition_shift(self.text_input(text), fake_rows)  # (B, S, H)
        weights = text_mask.to(tokens.dtype)[..., None]  # (B, S, 1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)
        time = combine_time_embeddings(
            self.time_text_embed(t), self.time_text_embed_2(target_time), t, target_time
        )
        condition = time + pooled
        hidden = self.input(x_t)
        for block in self.blocks:
            hidden = block(hidden, condition)
        return self.output(self.output_norm(hidden))
