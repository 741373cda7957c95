"""Semantic ID benchmark on Amazon Scientific: RQ-VAE vs residual k-means, and encoder throughput.

Protocol (quality, the default mode):

* items: ``Scientific.text`` (ASIN, text; 4,385 items with text), read directly; never copied.
* encoding, once: the frozen content encoder (default all-MiniLM-L6-v2, 384-d, unit vectors)
  encodes every text with no cache (a fresh ``TextEncoder``). One batch of the longest texts is
  encoded first as a warm-up and excluded; throughput is items / wall seconds of the rest.
* quantizers, side by side, each with the default ``SidConfig`` (3 levels x 256 codes, code dim
  32, seed 0): RQ-VAE, RQ-VAE without its collision repulsion (``collision_repulsion: 0``), and
  residual k-means. The real ``train_sids`` runs on the items with its encoder cache pre-filled from
  that one encoding (0 cache misses, asserted), so every variant quantizes the same vectors.
* figures, from the written ``item_semantics`` table and the frozen tokenizer:

  - utilization and perplexity per level, of the SID codes (level 1 is the target);
  - collisions before the disambiguation level: the share of items whose residual-code tuple
    (first ``levels`` codes) is shared with at least one other item, for the SID codes written
    (after the unique-last-level matching, ``SidConfig.unique_last_level``) and for the frozen
    tokenizer's nearest codes alone (the target: the matching is itself a disambiguation step);
    ``1 - unique tuples / items`` is shown too;
  - reconstruction cosine: mean cosine between each content vector and its quantized
    reconstruction (RQ-VAE: decoder output; rkmeans: sum of centroids; nearest codes);
  - semantic coherence: mean cosine of ``--pairs`` random item pairs sharing the first code vs
    ``--pairs`` random pairs, and their ratio;
  - training time (quantizer fit, encoding excluded) and the whole ``train_sids`` call.

Targets (issue 3): level-1 utilization >= 90%, collisions before disambiguation <= 5%, coherence
ratio >= 2. Prints a table and writes ``benchmarks/results/sids.json``.

    .venv/bin/python benchmarks/sids.py [--threads 1] [--batch-size 64] [--seed 0]

Throughput only (imports only ``training.sids.encoder`` and what it needs: torch, numpy,
pyarrow, pydantic, tqdm, transformers / sentence-transformers; no feast, duckdb or the
quantizers): texts from ``--text-file``, repeated to reach ``--items``, no cache, one warm-up
batch excluded, ``--repeats`` timed passes per batch size (median reported); writes
``benchmarks/results/sids_throughput_<device>.json``. ``--dtype`` casts the model's weights.

    python benchmarks/sids.py --throughput-only --device cuda --dtype float16 \\
        --encoder PATH --items 100000 --batch-size 256 512 1024 --text-file .../Scientific.text
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere, with or without an install

DATA = ROOT.parent / "shared" / "datasets" / "amazon-scientific" / "Scientific.text"
RESULTS = Path(__file__).resolve().parent / "results"
# Quantizers side by side: the default RQ-VAE, the same without its collision repulsion (the
# loss that pushes colliding near-duplicates apart), and residual k-means.
VARIANTS: dict[str, dict[str, Any]] = {
    "rqvae": {"method": "rqvae"},
    "rqvae_no_repulsion": {"method": "rqvae", "collision_repulsion": 0.0},
    "rkmeans": {"method": "rkmeans"},
}
LABELS = {
    "rqvae": "RQ-VAE",
    "rqvae_no_repulsion": "RQ-VAE, no repulsion",
    "rkmeans": "residual k-means",
}
TARGETS = {"level1_utilization": 0.90, "shared_prefix_rate": 0.05, "coherence_ratio": 2.0}


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    """Item ids and texts of a UniSRec ``.text`` file (header line, then ``id<TAB>text``)."""
    ids, texts = [], []
    with path.open(encoding="utf-8") as fh:
        header = fh.readline()
        if "\t" not in header:
            raise ValueError(f"{path}: expected a header 'item_id:token<TAB>text:token_seq'")
        for lineno, line in enumerate(fh, start=2):
            item_id, sep, text = line.rstrip("\n").partition("\t")
            if not sep or not item_id.strip() or not text.strip():
                raise ValueError(f"{path}:{lineno}: expected 'item_id<TAB>text'")
            ids.append(item_id.strip())
            texts.append(text.strip())
    return ids, texts


def machine(device: str) -> dict[str, Any]:
    """Where the figures were taken: CPU, accelerator and library versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for package in ("torch", "transformers", "sentence-transformers", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ----------------------------------------------------------------------------- encoding throughput


def load_encoder(model_path: str | None, device: str, dtype: str, batch_size: int) -> Any:
    """A ``TextEncoder`` on ``device``, its weights cast to ``dtype``."""
    import torch

    from training.sids.encoder import EncoderConfig, TextEncoder

    cfg = EncoderConfig(model_path=model_path, batch_size=batch_size, device=device)
    encoder = TextEncoder(cfg)
    if dtype != "float32":
        # The stage encodes in float32; half precision is a benchmark option only.
        module = encoder._st if encoder._st is not None else encoder._model
        module.to(getattr(torch, dtype))
    return encoder


def timed_encode(
    encoder: Any, texts: list[str], batch_size: int, repeats: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode ``texts`` ``repeats`` times after a warm-up batch; vectors and timings.

    The warm-up encodes one batch of the longest texts (the first batch ``encode`` runs, the
    largest padded shape), so allocator growth and kernel selection stay out of the timings.
    ``encode_batch`` returns host arrays, so every timed call has finished on the device.
    """
    import torch

    encoder.cfg = encoder.cfg.model_copy(update={"batch_size": batch_size})
    longest = sorted(texts, key=len, reverse=True)[:batch_size]
    began = time.perf_counter()
    encoder.encode_batch(longest)
    warmup = time.perf_counter() - began
    seconds = []
    vectors = np.zeros((0, 0), dtype=np.float32)
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        vectors = encoder.encode(texts, show_progress=False)
        seconds.append(time.perf_counter() - began)
    rates = [len(texts) / s for s in seconds]
    return vectors, {
        "batch_size": batch_size,
        "items": len(texts),
        "warmup_seconds": round(warmup, 3),
        "seconds": [round(s, 3) for s in seconds],
        "items_per_second": [round(r, 1) for r in rates],
        "items_per_second_median": round(statistics.median(rates), 1),
    }


def throughput_only(args: argparse.Namespace) -> None:
    """Encoding throughput alone: repeated texts, no cache, one row per batch size."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _, texts = read_texts(args.text_file)
    n = args.items or len(texts)
    texts = [texts[k % len(texts)] for k in range(n)]
    began = time.perf_counter()
    encoder = load_encoder(args.encoder, args.device, args.dtype, args.batch_size[0])
    load_seconds = time.perf_counter() - began
    rows = []
    dim = 0
    for size in args.batch_size:
        vectors, row = timed_encode(encoder, texts, size, args.repeats)
        dim = int(vectors.shape[1])
        rows.append(row)
        print(
            f"batch {size:>5}: {row['items_per_second_median']:>10,.1f} items/s "
            f"(runs {row['items_per_second']}, warm-up {row['warmup_seconds']} s)"
        )
    out = args.out or RESULTS / f"sids_throughput_{args.device}.json"
    report = {
        "benchmark": "sids_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "encoder": str(getattr(encoder, "path", args.encoder)),
        "dtype": args.dtype,
        "max_length": encoder.cfg.max_length,
        "embedding_dim": dim,
        "text_file": str(args.text_file),
        "distinct_texts": len(set(texts)),
        "load_seconds": round(load_seconds, 3),
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{n:,} texts, {args.device} {args.dtype}; wrote {out}")


# ---------------------------------------------------------------------------------------- quality


def shared_prefix_rate(codes: np.ndarray) -> float:
    """Share of items whose code tuple is also another item's (every member of a group counts)."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse.ravel()] > 1))


def run_method(
    name: str,
    items: Any,
    vectors: np.ndarray,
    encoder_cfg: Any,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``train_sids`` with the variant ``name`` on pre-encoded items; the benchmark's figures."""
    from training.sids import metrics as quality
    from training.sids.config import SidConfig
    from training.sids.encoder import (
        EmbeddingCache,
        encoder_fingerprint,
        list_column_matrix,
        text_sha256,
    )
    from training.sids.ids import collision_rate
    from training.sids.job import CACHE_FILE, train_sids

    cfg = SidConfig(**VARIANTS[name], seed=args.seed, show_progress=False, encoder=encoder_cfg)
    method = cfg.method
    out = work / name
    # Pre-fill the stage's own cache with the one encoding, so train_sids encodes nothing.
    cache = EmbeddingCache(out / CACHE_FILE, encoder_fingerprint(encoder_cfg))
    for item_id, text, vec in zip(
        items.column("item_id").to_pylist(), items.column("text").to_pylist(), vectors, strict=True
    ):
        cache.put(item_id, text_sha256(text), vec)
    cache.save()

    began = time.perf_counter()
    result = train_sids(items, cfg, out)
    stage_seconds = time.perf_counter() - began
    m = result.metrics
    if m["cache_misses"]:
        raise RuntimeError(f"{name}: {m['cache_misses']} texts re-encoded; the cache missed")

    x = np.array(list_column_matrix(result.table.column("content_embedding")))  # writable
    sid = list_column_matrix(result.table.column("sid_codes")).astype(np.int64)
    prefix = sid[:, :-1]
    nearest = result.tokenizer.codes(x)
    k = cfg.codebook_size
    coherence = quality.coherence(x, prefix[:, 0], pairs=args.pairs, seed=args.seed)
    return {
        "config": {
            "levels": cfg.levels,
            "codebook_size": k,
            "code_dim": cfg.code_dim if method == "rqvae" else int(x.shape[1]),
            "epochs": cfg.epochs if method == "rqvae" else None,
            "unique_last_level": cfg.unique_last_level,
            "balanced_assignment": cfg.balanced_assignment,
            "reseed_dead_codes": cfg.reseed_dead_codes if method == "rqvae" else None,
            "collision_repulsion": cfg.collision_repulsion if method == "rqvae" else None,
            "seed": cfg.seed,
        },
        "utilization": quality.utilization(prefix, k),
        "perplexity": quality.perplexity(prefix, k),
        "shared_prefix_rate": shared_prefix_rate(prefix),
        "shared_prefix_rate_nearest": shared_prefix_rate(nearest),
        "collision_rate": collision_rate(prefix),
        "collision_rate_nearest": collision_rate(nearest),
        "last_level_reassigned": int((prefix[:, -1] != nearest[:, -1]).sum()),
        "items_with_disambiguation_index": int((sid[:, -1] > 0).sum()),
        "codebook_sizes": result.codebook_sizes,
        "recon_cosine": m["recon_cosine"],
        "recon_mse": m["recon_mse"],
        "coherence": coherence,
        "train_seconds": m["train_seconds"],
        "stage_seconds": round(stage_seconds, 3),
        "quantizer": {
            key: m[key]
            for key in (
                "loss_first_epoch",
                "loss_last_epoch",
                "dead_codes_reseeded",
                "colliding_items_per_epoch",
            )
        }
        if method == "rqvae"
        else {"inertia": m["inertia"]},
    }


def near_duplicates(vectors: np.ndarray, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Share of items whose nearest other item is at cosine >= each threshold."""
    best = np.full(len(vectors), -1.0, dtype=np.float32)
    for start in range(0, len(vectors), 2048):
        sims = vectors[start : start + 2048] @ vectors.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -1.0
        best[start : start + 2048] = sims.max(1)
    return {f"{t:g}": round(float(np.mean(best >= t)), 4) for t in thresholds}


def quality_run(args: argparse.Namespace) -> None:
    """Encode once, fit both quantizers, print the table and write the JSON."""
    import pyarrow as pa
    import torch

    from training.data.contract import TIMESTAMP
    from training.sids.encoder import EncoderConfig, fuse

    ids, texts = read_texts(args.text_file)
    if args.items:
        ids, texts = ids[: args.items], texts[: args.items]
    items = pa.table(
        {
            "item_id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "event_timestamp": pa.array([datetime(2024, 1, 1, tzinfo=UTC)] * len(ids), TIMESTAMP),
        }
    )
    encoder_cfg = EncoderConfig(
        model_path=args.encoder, batch_size=args.batch_size[0], device=args.device
    )

    print(f"encoding {len(texts):,} texts on {args.device} ...", flush=True)
    began = time.perf_counter()
    encoder = load_encoder(args.encoder, args.device, args.dtype, args.batch_size[0])
    load_seconds = time.perf_counter() - began
    text_vectors, encoding = timed_encode(encoder, texts, args.batch_size[0], args.repeats)
    del encoder
    encoding["load_seconds"] = round(load_seconds, 3)
    encoding["dtype"] = args.dtype
    # Same fusion as the stage: no content_embedding column, so the unit text vectors.
    vectors, _ = fuse(text_vectors, None, encoder_cfg)

    # The quantizers are small: one thread avoids waiting on descheduled peers on a busy box.
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_sids_") as tmp:
        for name in VARIANTS:
            print(f"fitting {LABELS[name]} ...", flush=True)
            results[name] = run_method(name, items, vectors, encoder_cfg, Path(tmp), args)

    checks = {
        name: {
            "level1_utilization": r["utilization"][0] >= TARGETS["level1_utilization"],
            # Before any disambiguation: the quantizer's own nearest codes, not the SID codes
            # after the last-level matching (which is a disambiguation step).
            "shared_prefix_rate": r["shared_prefix_rate_nearest"] <= TARGETS["shared_prefix_rate"],
            "coherence_ratio": r["coherence"]["ratio"] >= TARGETS["coherence_ratio"],
        }
        for name, r in results.items()
    }
    report = {
        "benchmark": "sids",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {
            "text_file": str(args.text_file),
            "items": len(ids),
            "distinct_texts": len(set(texts)),
            "embedding_dim": int(vectors.shape[1]),
            "items_with_neighbour_at_cosine": near_duplicates(vectors, (0.95, 0.98, 0.99, 0.999)),
        },
        "encoding": encoding,
        "targets": TARGETS,
        "results": results,
        "targets_met": checks,
    }
    args.out = args.out or RESULTS / "sids.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


def print_table(report: dict[str, Any]) -> None:
    """The side-by-side table of the quality run."""
    res = report["results"]
    enc = report["encoding"]

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    def levels(vals: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in vals)

    rows = [
        ("level-1 utilization (>= 90%)", lambda r: pct(r["utilization"][0])),
        ("utilization per level", lambda r: levels([100 * u for u in r["utilization"]], ".1f")),
        ("perplexity per level (of 256)", lambda r: levels(r["perplexity"], ".1f")),
        ("items sharing nearest codes (<= 5%)", lambda r: pct(r["shared_prefix_rate_nearest"])),
        ("  1 - unique nearest / items", lambda r: pct(r["collision_rate_nearest"])),
        ("items sharing SID prefix", lambda r: pct(r["shared_prefix_rate"])),
        ("  1 - unique prefixes / items", lambda r: pct(r["collision_rate"])),
        ("last code re-assigned (items)", lambda r: f"{r['last_level_reassigned']:,}"),
        ("non-zero disambiguation code", lambda r: f"{r['items_with_disambiguation_index']:,}"),
        ("reconstruction cosine", lambda r: f"{r['recon_cosine']:.3f}"),
        ("cosine, same level-1 code", lambda r: f"{r['coherence']['same_code_cosine']:.3f}"),
        ("cosine, random pairs", lambda r: f"{r['coherence']['random_cosine']:.3f}"),
        ("coherence ratio (>= 2x)", lambda r: f"{r['coherence']['ratio']:.2f}x"),
        ("training seconds", lambda r: f"{r['train_seconds']:.1f}"),
        ("train_sids seconds (cached enc.)", lambda r: f"{r['stage_seconds']:.1f}"),
    ]
    data = report["data"]
    print(
        f"\nAmazon Scientific: {data['items']:,} items, {data['embedding_dim']}-d vectors; "
        "3 levels x 256 codes, code dim 32 (defaults)"
    )
    print(f"{'':<36}" + "".join(f"{LABELS[name]:>22}" for name in res))
    for label, cell in rows:
        print(f"{label:<36}" + "".join(f"{cell(r):>22}" for r in res.values()))
    print(
        f"\nencoding: {enc['items_per_second_median']:,.1f} items/s ({enc['items']:,} texts, batch "
        f"{enc['batch_size']}, {report['machine']['device']} {enc['dtype']}, no cache, warm-up "
        f"batch excluded; model load {enc['load_seconds']} s)"
    )
    for name, checks in report["targets_met"].items():
        verdict = ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in checks.items())
        print(f"targets {LABELS[name]}: {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--text-file", type=Path, default=DATA, help="UniSRec .text file")
    p.add_argument("--encoder", default=None, help="encoder directory (default: bundled MiniLM)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[64],
        help="texts per forward pass; several values (throughput mode) give one row each",
    )
    p.add_argument("--items", type=int, default=None, help="quality: first N items; throughput: N")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed passes per batch size, the median reported (default: 3 throughput-only, "
        "1 quality); the first pass still pays first-use costs of shapes the warm-up missed",
    )
    p.add_argument("--throughput-only", action="store_true", help="measure encoding only")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (quality default: 1 for fits)"
    )
    p.add_argument("--pairs", type=int, default=20_000, help="pairs sampled for coherence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.throughput_only:
        args.repeats = args.repeats or 3
        throughput_only(args)
    else:
        args.threads = args.threads or 1
        args.repeats = args.repeats or 1
        quality_run(args)


if __name__ == "__main__":
    main()
