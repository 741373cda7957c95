"""What the trained anchor LM adds to its prior: the same search with the LM's logits zeroed.

Takes the work directory of an ``anchors_quality.py`` run (its SIDs and its model, trained with
the co-occurrence prior fused) and decodes the Amazon Scientific test users twice with the
product's beam search, at the prior's weight, with the user's own items left out when asked:
once with the trained LM, once with a copy whose output head and token embeddings are zeroed,
so every next-code distribution is uniform over the codes the trie allows and the fused search
follows the prior alone (up to the beam's pruning). The difference is what the LM contributes on
top of the prior; the prior's exact item-level ranking is printed beside for the beam's own
loss.

    .venv/bin/python benchmarks/anchors_uniform_lm.py --work-dir runs/R [--exclude-history] \\
        [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from anchors_quality import (
    DATA,
    anchor_lists,
    cooc_baseline,
    cooc_lists,
    load,
    metrics,
    paired_comparison,
    positives_table,
    prior_alone_lists,
)
from safetensors.torch import load_file, save_file

from training.anchors.job import AnchorConfig
from training.anchors.prior import CooccurrencePrior


def zero_lm(model_dir: Path, into: Path) -> Path:
    """A copy of ``model_dir`` whose output head and token embeddings are all zeros."""
    shutil.copytree(model_dir, into)
    weights = sorted((into / "model").glob("*.safetensors"))
    if not weights:
        raise SystemExit(f"{into / 'model'} holds no safetensors weights")
    for path in weights:
        tensors = load_file(path)
        for name in tensors:
            if "lm_head" in name or "embed_tokens" in name:
                tensors[name] = torch.zeros_like(tensors[name])
        save_file(tensors, path, metadata={"format": "pt"})
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, required=True, help="an anchors_quality.py work dir")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--beam-width", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_uniform_lm.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load(args.data, None, 0)
    test, index = data["test"], data["index"]
    targets = [t for _, _, t in test]
    histories = [h for _, h, _ in test]
    semantics = pq.read_table(args.work_dir / "sids" / "item_semantics.parquet")
    positives = positives_table(test, index)
    model_dir = args.work_dir / "model"
    prior = CooccurrencePrior.load(model_dir)
    if prior is None or not prior.train_weight:
        raise SystemExit(f"{model_dir}: not a model trained with the prior fused")
    cfg = AnchorConfig.model_validate(
        {
            "generation": {
                "beam_width": args.beam_width,
                "num_anchors": args.beam_width,
                "batch_size": 64,
                "device": args.device,
                "exclude_history": args.exclude_history,
            },
            "prior": {"weight": prior.train_weight},
            "sequences": {"max_history": 50},
        }
    )
    tuned = cooc_baseline(test, len(index), 10, exclude_history=args.exclude_history)
    baseline = cooc_lists(histories, len(index), tuned, 10, exclude_history=args.exclude_history)
    lists: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uniform = zero_lm(model_dir, Path(tmp) / "uniform")
        for name, model in (
            ("trained_lm_with_prior", model_dir),
            ("uniform_lm_with_prior", uniform),
        ):
            recs, _ = anchor_lists(
                semantics, positives, [model], cfg, Path(tmp) / f"anchors_{name}", test, index
            )
            lists[name] = [r[:10] for r in recs]
    lists["prior_alone_exact"] = prior_alone_lists(
        model_dir, cfg, histories, index, args.exclude_history
    )
    lists["cooccurrence"] = baseline
    results: dict[str, Any] = {
        name: {
            **metrics(recs, targets),
            "vs_cooccurrence": paired_comparison(recs, baseline, targets),
        }
        for name, recs in lists.items()
    }
    results["trained_minus_uniform"] = paired_comparison(
        lists["trained_lm_with_prior"], lists["uniform_lm_with_prior"], targets
    )
    report = {
        "benchmark": "anchors_uniform_lm",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prior": {
            "train_weight": prior.train_weight,
            "content_weight": prior.content_weight,
            "content_temperature": prior.content_temperature,
        },
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'list':<26}{'HR@5':>9}{'NDCG@5':>9}{'HR@10':>9}{'NDCG@10':>9}   HR@10 - cooc [95% CI]")
    for name, r in results.items():
        if name == "trained_minus_uniform":
            continue
        c = r["vs_cooccurrence"]
        print(
            f"{name:<26}{r['hr@5']:>9.4f}{r['ndcg@5']:>9.4f}{r['hr@10']:>9.4f}{r['ndcg@10']:>9.4f}"
            f"   {c['hr@10_diff']:+.4f} {c['hr@10_diff_ci95']}"
        )
    d = results["trained_minus_uniform"]
    print(f"trained LM - uniform LM, HR@10: {d['hr@10_diff']:+.4f} {d['hr@10_diff_ci95']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
