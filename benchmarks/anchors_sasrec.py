"""How strong is the co-occurrence baseline? A tuned item-ID sequential recommender, same split.

``benchmarks/anchors_quality.py`` asks the anchors to beat item-to-item co-occurrence on Amazon
Scientific; every anchor list so far ties with it. This script asks whether the standard
sequential recommender of the literature, a SASRec-style causal Transformer over item IDs (Kang &
McAuley, 2018) trained with a full softmax over the catalog on every position (the "cross-entropy"
SASRec of Klenitskiy & Vasilev, 2023, stronger than the original negative sampling), beats it on
the same users, the same training data and the same protocol:

* the split, the held-out users and the test targets are those of ``anchors_quality.py``: the last
  positive of ``--eval-users`` users (seeded) is held out for early stopping and model selection,
  every other positive is training data, and the test target (the user's real next item) is
  never seen;
* co-occurrence is the baseline's tuned cell, refit on every history, in the same run; every
  model's test list is compared with it user by user (95% paired bootstrap, ``paired_comparison``);
* a grid of settings (hidden size, dropout, reverse augmentation: training also on each sequence
  reversed, which lifted the SID LM) is trained, each with early stopping on the held-out users'
  NDCG@10; the setting the held-out users rank first is "the" SASRec figure, and every cell's test
  figures are written for the record.

Prints a table and writes ``benchmarks/results/anchors_sasrec.json``.

    .venv/bin/python benchmarks/anchors_sasrec.py [--device cuda] [--hidden 64 128] ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anchors_quality import DATA, cooc_baseline, cooc_lists, load, metrics, paired_comparison
from torch import nn


class SasRec(nn.Module):
    """Causal self-attention over item IDs; the output is scored against the item embeddings."""

    def __init__(
        self, n_items: int, hidden: int, layers: int, heads: int, dropout: float, max_len: int
    ):
        super().__init__()
        # Row 0 is padding; item r of the catalog is row r + 1.
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.max_len = max_len
        self.heads = heads
        # Small initial embeddings (as BERT/GPT): with PyTorch's N(0, 1) default the first logits,
        # hidden state against item embedding, are of the order of the hidden size and the
        # softmax starts saturated; such runs stayed near most-popular for 50+ epochs.
        for emb in (self.items, self.positions):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Left-padded item rows ``[batch, length]`` -> hidden states ``[batch, length, d]``."""
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        x = self.dropout(self.items(seq) * self.items.embedding_dim**0.5 + self.positions(pos))
        # Left padding: no query sees a padded key or a later position, but every position sees
        # itself, so that the padded queries (never scored) keep a finite softmax: a row with
        # every key masked would turn to NaN and reach the real rows through the next layer.
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
        blocked = blocked | (seq == 0)[:, None, :]
        blocked &= ~torch.eye(length, dtype=torch.bool, device=seq.device)
        x = self.encoder(x, mask=blocked.repeat_interleave(self.heads, dim=0))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item (padding row dropped), ``[..., n_items]``."""
        return hidden @ self.items.weight[1:].T


def left_pad(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """The last ``max_len`` items of each sequence, as rows ``+ 1``, left-padded with 0."""
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for i, s in enumerate(seqs):
        tail = s[-max_len:]
        if tail:
            out[i, max_len - len(tail) :] = torch.tensor(tail) + 1
    return out


def top_k(
    model: SasRec, histories: list[list[int]], k: int, device: str, batch: int = 512
) -> list[list[int]]:
    """Each history's ``k`` best-scoring catalog rows after its last item."""
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(histories), batch):
            seq = left_pad(histories[start : start + batch], model.max_len).to(device)
            scores = model.logits(model(seq)[:, -1])
            out += scores.topk(k, dim=1).indices.cpu().tolist()
    return out


def train_one(
    train_seqs: list[list[int]],
    val_hist: list[list[int]],
    val_target: list[int],
    n_items: int,
    setting: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[SasRec, dict[str, Any]]:
    """Train with early stopping on the held-out users' NDCG@10; return the best epoch's model."""
    seed = args.seed if args.model_seed is None else args.model_seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SasRec(
        n_items, setting["hidden"], args.layers, args.heads, setting["dropout"], args.max_len
    ).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    seqs = [s for s in train_seqs if len(s) >= 2]
    if setting["reverse"]:
        seqs += [s[::-1] for s in seqs]
    # max_len + 1 items: inputs are the first max_len, labels the last max_len. A user's last item
    # then sits at position max_len - 1 in training as in scoring (``top_k`` reads max_len items).
    data = left_pad(seqs, args.max_len + 1)
    best: dict[str, Any] = {"ndcg@10": -1.0}
    state: dict[str, torch.Tensor] = {}
    history = []
    started = time.perf_counter()
    stopped_by = "epochs"
    for epoch in range(1, args.epochs + 1):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            stopped_by = "time limit"
            break
        model.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for idx in np.array_split(rng.permutation(len(data)), max(1, len(data) // args.batch_size)):
            batch = data[torch.from_numpy(idx)].to(args.device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            # A position is trained when both it and its next item are real items.
            keep = (inputs > 0) & (labels > 0)
            logits = model.logits(model(inputs)[keep])
            loss = nn.functional.cross_entropy(logits, labels[keep] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(keep.sum())
            count += int(keep.sum())
        val = metrics(top_k(model, val_hist, 10, args.device), val_target)
        history.append(
            {
                "epoch": epoch,
                "loss": round(total / count, 4),
                "seconds": round(time.perf_counter() - t0, 2),
                **val,
            }
        )
        print(
            f"  epoch {epoch}: loss {total / count:.4f}, held-out HR@10 {val['hr@10']:.4f} "
            f"NDCG@10 {val['ndcg@10']:.4f} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        if val["ndcg@10"] > best["ndcg@10"]:
            best = {"epoch": epoch, **val}
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best["epoch"] >= args.patience:
            stopped_by = "patience"
            break
    model.load_state_dict(state)
    return model, {
        "best_epoch": best["epoch"],
        "stopped_by": stopped_by,
        "validation": best,
        "epochs": history,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--max-users", type=int, default=None, help="subsample users (quick runs)")
    p.add_argument(
        "--eval-users", type=int, default=2000, help="held-out users, as anchors_quality.py"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out users and the model")
    p.add_argument(
        "--model-seed",
        type=int,
        default=None,
        help="seed of the model's initialization and batch order only (default: --seed)",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dropout", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument(
        "--reverse",
        choices=["off", "on", "both"],
        default="both",
        help="reverse augmentation cells",
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50, help="history items read, as the anchor LM")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds of training per cell, after which its best epoch so far is kept",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_sasrec.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    data = load(args.data, args.max_users, args.seed)
    test, index = data["test"], data["index"]
    # Catalog rows in the order of the item indices (the .inter files' ids).
    row = {idx: r for r, idx in enumerate(sorted(index))}
    histories = [[row[i] for i in h] for _, h, _ in test]
    targets = [row[t] for _, _, t in test]
    n_items = len(index)

    # The anchor LM's hold-out exactly (``holdout_split``): users in the order of their ids
    # ("u" + the file's user), the last positive of a seeded sample of those with two or more.
    order = sorted(range(len(test)), key=lambda u: f"u{test[u][0]}")
    eligible = np.array([k for k, u in enumerate(order) if len(histories[u]) >= 2])
    picked = np.random.default_rng(args.seed).permutation(eligible)[: args.eval_users]
    held = {order[k] for k in picked.tolist()}
    train_seqs = [h[:-1] if u in held else h for u, h in enumerate(histories)]
    val_users = sorted(held)
    val_hist = [histories[u][:-1] for u in val_users]
    val_target = [histories[u][-1] for u in val_users]

    # Co-occurrence in the baseline's protocol (tuned on each history's last item, refit on all).
    test_rows = [(user, h, t) for (user, _, _), h, t in zip(test, histories, targets, strict=True)]
    cooc = cooc_baseline(test_rows, n_items, 10)
    cooc_recs = cooc_lists(histories, n_items, cooc, 10)

    reverse = {"off": [False], "on": [True], "both": [False, True]}[args.reverse]
    cells = []
    for hidden, dropout, rev in itertools.product(args.hidden, args.dropout, reverse):
        setting = {"hidden": hidden, "dropout": dropout, "reverse": rev}
        t0 = time.perf_counter()
        model, trained = train_one(train_seqs, val_hist, val_target, n_items, setting, args)
        recs = top_k(model, histories, 10, args.device)
        cell = {
            **setting,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.perf_counter() - t0, 1),
            **trained,
            "test": metrics(recs, targets),
            "vs_cooccurrence": paired_comparison(recs, cooc_recs, targets),
        }
        cells.append(cell)
        print(
            f"hidden {hidden} dropout {dropout} reverse {rev}: best epoch {cell['best_epoch']}, "
            f"validation NDCG@10 {cell['validation']['ndcg@10']:.4f}, test HR@10 "
            f"{cell['test']['hr@10']:.4f} NDCG@10 {cell['test']['ndcg@10']:.4f}",
            flush=True,
        )

    chosen = max(cells, key=lambda c: c["validation"]["ndcg@10"])
    print(
        f"\n{'method':<52}{'HR@5':>8}{'NDCG@5':>8}{'HR@10':>8}{'NDCG@10':>8}  HR@10 - cooc [95% CI]"
    )
    rows = [("co-occurrence (tuned, refit)", cooc, None)] + [
        (
            f"SASRec h{c['hidden']} p{c['dropout']}{' rev' if c['reverse'] else ''}"
            f"{' <- held-out users pick' if c is chosen else ''}",
            c["test"],
            c["vs_cooccurrence"],
        )
        for c in cells
    ]
    for name, m, vs in rows:
        tail = (
            ""
            if vs is None
            else f"  {vs['hr@10_diff']:+.4f} [{vs['hr@10_diff_ci95'][0]:+.4f}, "
            f"{vs['hr@10_diff_ci95'][1]:+.4f}]"
        )
        print(
            f"{name:<52}{m['hr@5']:>8.4f}{m['ndcg@5']:>8.4f}{m['hr@10']:>8.4f}{m['ndcg@10']:>8.4f}{tail}"
        )

    result = {
        "benchmark": "anchors_sasrec",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "users": len(test),
        "held_out_users": len(val_users),
        "items": n_items,
        "cooccurrence": cooc,
        "chosen": {k: chosen[k] for k in ("hidden", "dropout", "reverse")},
        "cells": cells,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
