"""The light and the expressive pre-ranker.

Both read the same inputs, already gathered from the item-embedding table (so an exported graph
takes vectors straight from the service's item cache):

=================  ==========  ===============================================================
input              shape       meaning
=================  ==========  ===============================================================
user_numeric       (R, Fu)     standardized user features, one row per request
history_emb        (R, H, D)   content vectors of the user's recent positives (zeros = padding)
anchor_emb         (R, A, D)   content vectors of the user's interest anchors (zeros = padding)
row_request        (N,)        request of each candidate row (int64)
item_numeric       (N, Fi)     standardized candidate features
category           (N,)        candidate category id (0 = other)
item_emb           (N, D)      candidate content vector (zeros = unknown item)
cross              (N, 4)      max cosine to the anchors, has anchors, max cosine to the
                               history, has history (:func:`training.preranker.data.cross_features`)
=================  ==========  ===============================================================

The *light* model is a two-tower model: the user tower runs once per request, the item tower
once per candidate, and a tiny head scores their element-wise product together with the
candidate's max cosine to the user's anchors and to the user's history. The *expressive*
model has wider towers, target attention of the candidate over the user's history and a deeper
MLP on the concatenation.

Both split into an **item side** (:meth:`item_side`: everything that depends on the candidate
alone: the item tower and, for the expressive model, the attention query) and a **score side**
(:meth:`score_side`: the user side and everything that mixes user and candidate). ``forward``
is exactly ``score_side(..., item_side(...), cross)``, so a server may compute the item side once
per item and reuse it for every request (:mod:`export.onnx_export` exports both halves).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from training.preranker.config import ModelSettings


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _masked_mean(emb: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(emb.dtype).unsqueeze(-1)
    return (emb * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _per_row_dot(query: Tensor, keys: Tensor, row_request: Tensor) -> Tensor:
    """``query[n] . keys[row_request[n], j]`` for every row n and slot j: (N, S).

    One matmul against all requests' keys, then a gather of each row's own request: cheaper
    than materializing (N, S, D) copies of the keys.
    """
    r, s, d = keys.shape
    every = query @ keys.reshape(r * s, d).T  # (N, R*S)
    cols = row_request.unsqueeze(1) * s + torch.arange(s, device=query.device).unsqueeze(0)
    return torch.gather(every, 1, cols)


class _TwoTowers(nn.Module, ABC):
    """The user and item towers both models share (each model sizes its own)."""

    category: nn.Embedding
    user_tower: nn.Sequential
    item_tower: nn.Sequential

    def user_vector(self, user_numeric: Tensor, history_emb: Tensor, anchor_emb: Tensor) -> Tensor:
        """User vectors (R, t), once per request."""
        hist_mask = history_emb.abs().sum(-1) > 0
        anchor_mask = anchor_emb.abs().sum(-1) > 0
        user_in = [
            user_numeric,
            _masked_mean(history_emb, hist_mask),
            _masked_mean(anchor_emb, anchor_mask),
        ]
        out: Tensor = self.user_tower(torch.cat(user_in, dim=1))
        return out

    def item_vector(self, item_numeric: Tensor, category: Tensor, item_emb: Tensor) -> Tensor:
        """Item tower vectors (N, t).

        The tower's first layer reads ``[item_numeric, category embedding, item_emb]``; it is
        applied as three products with column blocks of its weight instead of one product with
        the concatenation. Same function and parameters, but in training only the category block
        needs a gradient with respect to its input: with the concatenation, autograd computes
        the input gradient of all ``Fi + category_dim + D`` columns (an ``N x D`` product per
        step, a third of the light model's backward) and copies the 384-wide vectors once more.
        """
        first = self.item_tower[0]
        assert isinstance(first, nn.Linear)
        n_num = item_numeric.shape[1]
        n_cat = self.category.embedding_dim
        w = first.weight
        hidden = torch.addmm(first.bias, item_emb, w[:, n_num + n_cat :].T)
        hidden = hidden + item_numeric @ w[:, :n_num].T
        hidden = hidden + self.category(category) @ w[:, n_num : n_num + n_cat].T
        out: Tensor = self.item_tower[1:](hidden)
        return out

    @abstractmethod
    def item_side(self, item_numeric: Tensor, category: Tensor, item_emb: Tensor) -> Tensor:
        """What depends on the candidate alone, (N, :attr:`item_side_width`)."""

    @property
    @abstractmethod
    def item_side_width(self) -> int:
        """Columns of :meth:`item_side`'s output."""

    @abstractmethod
    def score_side(
        self,
        user_numeric: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_state: Tensor,
        cross: Tensor,
    ) -> Tensor:
        """Logits (N,) from the user inputs and each row's :meth:`item_side` output."""

    def forward(
        self,
        user_numeric: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_numeric: Tensor,
        category: Tensor,
        item_emb: Tensor,
        cross: Tensor,
    ) -> Tensor:
        """Logits of every candidate row, (N,)."""
        state = self.item_side(item_numeric, category, item_emb)
        return self.score_side(user_numeric, history_emb, anchor_emb, row_request, state, cross)


class LightModel(_TwoTowers):
    """Two towers, element-wise product, a small head; user side once per request."""

    def __init__(self, n_user: int, n_item: int, dim: int, cfg: ModelSettings) -> None:
        super().__init__()
        self.tower_dim = cfg.tower_dim
        self.category = nn.Embedding(cfg.category_vocab + 1, cfg.category_dim)
        self.user_tower = _mlp([n_user + 2 * dim, cfg.light_hidden, cfg.tower_dim], cfg.dropout)
        self.item_tower = _mlp(
            [n_item + cfg.category_dim + dim, cfg.light_hidden, cfg.tower_dim], cfg.dropout
        )
        self.head = _mlp([cfg.tower_dim + 4, 16, 1], 0.0)

    def item_side(self, item_numeric: Tensor, category: Tensor, item_emb: Tensor) -> Tensor:
        """The item tower's vector, (N, tower_dim)."""
        return self.item_vector(item_numeric, category, item_emb)

    @property
    def item_side_width(self) -> int:
        """tower_dim."""
        return self.tower_dim

    def score_side(
        self,
        user_numeric: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_state: Tensor,
        cross: Tensor,
    ) -> Tensor:
        """Head on (user x item, cross) per row: (N,) logits."""
        user = self.user_vector(user_numeric, history_emb, anchor_emb)
        x = torch.cat([user[row_request] * item_state, cross], 1)
        out: Tensor = self.head(x).squeeze(1)
        return out


class ExpressiveModel(_TwoTowers):
    """Wider towers, target attention over the history, a deeper MLP."""

    def __init__(self, n_user: int, n_item: int, dim: int, cfg: ModelSettings) -> None:
        super().__init__()
        h, t, a = cfg.expressive_hidden, cfg.tower_dim, cfg.attention_dim
        self.tower_dim, self.attention_dim = t, a
        self.category = nn.Embedding(cfg.category_vocab + 1, cfg.category_dim)
        self.user_tower = _mlp([n_user + 2 * dim, h, h, t], cfg.dropout)
        self.item_tower = _mlp([n_item + cfg.category_dim + dim, h, h, t], cfg.dropout)
        self.query = nn.Linear(dim, a)
        self.key = nn.Linear(dim, a)
        self.value = nn.Linear(dim, t)
        self.scale = a**-0.5
        self.head = _mlp([4 * t + 4, h, h // 2, 1], cfg.dropout)

    def item_side(self, item_numeric: Tensor, category: Tensor, item_emb: Tensor) -> Tensor:
        """The item tower's vector and the attention query, (N, tower_dim + attention_dim)."""
        item = self.item_vector(item_numeric, category, item_emb)
        return torch.cat([item, self.query(item_emb)], 1)

    @property
    def item_side_width(self) -> int:
        """tower_dim + attention_dim."""
        return self.tower_dim + self.attention_dim

    def score_side(
        self,
        user_numeric: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_state: Tensor,
        cross: Tensor,
    ) -> Tensor:
        """Target attention and the deep head per row: (N,) logits."""
        item, query = item_state[:, : self.tower_dim], item_state[:, self.tower_dim :]
        user = self.user_vector(user_numeric, history_emb, anchor_emb)
        hist_mask = history_emb.abs().sum(-1) > 0  # (R, H)
        # Target attention: the candidate queries its user's history (keys per request once).
        keys = self.key(history_emb)  # (R, H, a)
        values = self.value(history_emb)  # (R, H, t)
        logits = _per_row_dot(query, keys, row_request) * self.scale  # (N, H)
        row_mask = hist_mask[row_request]
        weights = torch.softmax(logits.masked_fill(~row_mask, -1e4), dim=1)
        weights = weights * row_mask.to(weights.dtype)
        attended = torch.einsum("nh,nht->nt", weights, values[row_request])
        u = user[row_request]
        x = torch.cat([u, item, u * item, attended, cross], 1)
        out: Tensor = self.head(x).squeeze(1)
        return out


def build_model(
    kind: str, n_user: int, n_item: int, dim: int, cfg: ModelSettings
) -> LightModel | ExpressiveModel:
    """A fresh ``"light"`` or ``"expressive"`` model."""
    if kind == "light":
        return LightModel(n_user, n_item, dim, cfg)
    if kind == "expressive":
        return ExpressiveModel(n_user, n_item, dim, cfg)
    raise ValueError(f"unknown model kind {kind!r}: 'light' or 'expressive'")


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_candidate(
    model: LightModel | ExpressiveModel, dim: int, history: int, anchors: int
) -> dict[str, float]:
    """Multiply-accumulates x 2 per candidate row, and per request (the user side).

    Counts every matrix product; element-wise work, gathers and softmax are left out (they are
    a small, equal share for both models).
    """
    per_row = _linear_macs(model.item_tower) + _linear_macs(model.head)
    per_row += (anchors + history) * dim  # cosines to the anchors and history (cross)
    per_request = _linear_macs(model.user_tower)
    if isinstance(model, ExpressiveModel):
        per_row += _linear_macs(model.query)
        per_row += history * (model.query.out_features + model.value.out_features)
        per_request += history * (_linear_macs(model.key) + _linear_macs(model.value))
    return {"per_candidate": 2.0 * per_row, "per_request": 2.0 * per_request}
