"""ONNX Runtime compute of one pre-rank request, CPU vs CUDA execution provider, side by side.

Loads a bundle the way the service does (:func:`gpl_service.models.load_bundle`: verified,
smoke-tested) once per provider, then times exactly the service's model work for one request:
the light model on N candidates plus the expressive model on the top ``hard_fraction`` of them
(inputs built once; numpy in and out, so host-device copies are included, as in the service).
With a split bundle the same request is also timed on precomputed item states (the service's
default: only the score graphs run), and the item graphs over a whole catalog (what start-up and
each refresh precompute). Also times batches of R requests in one call (the GPU's throughput
side).

    .venv/bin/python benchmarks/ort_providers.py [--bundle runs/demo/bundle]

On a machine without a GPU only the CPU rows are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gpl_service.models import CUDA, LoadedBundle, gpu_present, load_bundle

ROOT = Path(__file__).resolve().parents[1]


def inputs_for(bundle: LoadedBundle, r: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic raw inputs: R requests, N candidates each, unit content vectors."""
    rng = np.random.default_rng(seed)
    d = bundle.embedding_dim

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal((*shape, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return {
        "user_features": rng.random((r, len(bundle.user_columns))).astype(np.float32) * 10,
        "history_emb": unit(r, bundle.history_length),
        "anchor_emb": unit(r, bundle.num_anchors),
        "row_request": np.repeat(np.arange(r, dtype=np.int64), n),
        "item_features": rng.random((r * n, len(bundle.item_columns))).astype(np.float32) * 10,
        "category": rng.integers(0, len(bundle.categories) + 1, r * n).astype(np.int64),
        "item_emb": unit(r * n),
    }


def one_request(bundle: LoadedBundle, inputs: dict[str, np.ndarray], quota: int) -> None:
    """Light on all rows, expressive on the top ``quota`` (as the service does for R = 1)."""
    light = bundle.run("light", inputs)
    hard = np.argsort(-light, kind="stable")[:quota]
    sub = dict(inputs)
    sub["row_request"] = np.zeros(quota, np.int64)
    sub["item_features"] = np.ascontiguousarray(inputs["item_features"][hard])
    sub["category"] = inputs["category"][hard]
    sub["item_emb"] = inputs["item_emb"][hard]
    bundle.run("expressive", sub)


def one_request_split(bundle: LoadedBundle, inputs: dict[str, np.ndarray], quota: int) -> None:
    """The same request on precomputed item states: only the two score graphs run."""
    user = {k: inputs[k] for k in ("user_features", "history_emb", "anchor_emb")}
    light = bundle.run_split(
        "light",
        {
            **user,
            "row_request": inputs["row_request"],
            "item_state": inputs["light_state"],
            "item_emb": inputs["item_emb"],
        },
    )
    hard = np.argsort(-light, kind="stable")[:quota]
    bundle.run_split(
        "expressive",
        {
            **user,
            "row_request": np.zeros(quota, np.int64),
            "item_state": np.ascontiguousarray(inputs["expressive_state"][hard]),
            "item_emb": np.ascontiguousarray(inputs["item_emb"][hard]),
        },
    )


def with_states(bundle: LoadedBundle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` plus each model's item states (what the service precomputes per item)."""
    return {
        **inputs,
        **{
            f"{kind}_state": bundle.item_state(
                kind, inputs["item_features"], inputs["category"], inputs["item_emb"]
            )
            for kind in ("light", "expressive")
        },
    }


def timed(fn: Any, iterations: int, warmup: int = 10) -> list[float]:
    """Wall times (ms) of ``fn()``."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iterations):
        began = time.perf_counter()
        fn()
        out.append((time.perf_counter() - began) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=ROOT / "runs" / "demo" / "bundle")
    p.add_argument("--sizes", default="1000,2000,5000,10000")
    p.add_argument("--batch", type=int, default=32, help="Requests per call in the batch rows.")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument(
        "--catalog",
        type=int,
        default=50_000,
        help="Items whose states are precomputed in the item-graph row (as at start-up).",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ort_providers.json")
    args = p.parse_args()
    providers = ["cpu"] + (
        ["cuda"] if gpu_present() and CUDA in ort.get_available_providers() else []
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for provider in providers:
        bundle = load_bundle(args.bundle, providers=provider)  # type: ignore[arg-type]
        for n in sizes:
            inputs = inputs_for(bundle, 1, n)
            quota = math.ceil(bundle.hard_fraction * n)
            paths = [("full graphs", one_request, inputs)]
            if bundle.split:
                paths.append(("score graphs", one_request_split, with_states(bundle, inputs)))
            for graphs, fn, feeds in paths:
                ms = timed(lambda f=fn, b=bundle, i=feeds, q=quota: f(b, i, q), args.iterations)
                rows.append(
                    {
                        "provider": provider,
                        "used": bundle.providers[0],
                        "graphs": graphs,
                        "requests_per_call": 1,
                        "candidates": n,
                        "p50_ms": float(np.percentile(ms, 50)),
                        "p99_ms": float(np.percentile(ms, 99)),
                        "candidates_per_s": n / (float(np.median(ms)) / 1e3),
                    }
                )
        if bundle.split:  # precomputing the catalog's item states, as at start-up / reload
            catalog = inputs_for(bundle, 1, args.catalog, seed=1)
            ms = timed(lambda b=bundle, c=catalog: with_states(b, c), 5, warmup=1)
            rows.append(
                {
                    "provider": provider,
                    "used": bundle.providers[0],
                    "graphs": "item graphs (both models)",
                    "requests_per_call": 1,
                    "candidates": args.catalog,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "candidates_per_s": args.catalog / (float(np.median(ms)) / 1e3),
                }
            )
        n = 2000
        batch = inputs_for(bundle, args.batch, n)
        ms = timed(lambda b=bundle, i=batch: b.run("light", i), max(args.iterations // 4, 10))
        rows.append(
            {
                "provider": provider,
                "used": bundle.providers[0],
                "graphs": "full graphs, light only",
                "requests_per_call": args.batch,
                "candidates": n,
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "candidates_per_s": args.batch * n / (float(np.median(ms)) / 1e3),
            }
        )
    print(f"bundle {args.bundle}, light on all + expressive on the top share, one request per call")
    print(
        f"{'provider':<10}{'graphs':<28}{'R':>4}{'N':>7}{'p50 ms':>10}{'p99 ms':>10}{'cand/s':>14}"
    )
    for r in rows:
        print(
            f"{r['used'].replace('ExecutionProvider', ''):<10}{r['graphs']:<28}"
            f"{r['requests_per_call']:>4}"
            f"{r['candidates']:>7}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
            f"{r['candidates_per_s']:>14,.0f}"
        )
    out = {
        "benchmark": "ort_providers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/ort_providers.py "
        + " ".join(f"--{k} {v}" for k, v in (("sizes", args.sizes), ("batch", args.batch))),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "gpu": os.environ.get("GPU_NAME"),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
