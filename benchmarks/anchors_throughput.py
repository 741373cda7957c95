"""Anchor generation throughput: the fast batched beam search vs Hugging Face generate().

Same random model, trie and histories for both, in one run: users with ``--history``-item
histories (50), beam width 20, 10 anchors, a catalog of ``--items`` random SIDs over
``--levels`` codebooks of ``--codebook-size`` codes plus a disambiguation level. Models (random
weights, so only speed is measured):

* ``compact``: the stage's default compact Qwen2 (hidden 128, 2 layers since 2026-12-04; the
  figures recorded before then are of the earlier default, hidden 256, 4 layers), the CPU
  default;
* ``qwen2.5-0.5b-shaped``: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
  MLP 4864, tied 151,936-token vocabulary plus the SID tokens), for GPU runs.

The ``generate()`` reference is slow (a B-fold prefill, full-vocabulary logits), so it runs on the
first ``--reference-users`` users only (default: at most 256); both paths report users/s, and the
anchors of the users both decoded are compared (identical lists, top-1, overlap, log-prob gap).
Batches that run out of GPU memory are halved and retried (as in the job); a path that fails
even so is reported as failed with the error in one line, and the script exits with status 2.

``--prior-weight W`` also times the fast path with the co-occurrence prior fused in
(``training/anchors/prior.py``, fitted on the benchmark's own random histories), interleaved with
the plain fast path (``fast``, ``fast+prior``, ``fast#2``, ``fast+prior#2``). The prior's rows are
sparse, as generation builds them (the background's mass per prefix and each user's few
co-occurring items, looked up by binary search); ``--prior-dense`` also times them as the dense
``[batch, items]`` table of before (``fast+prior-dense``, interleaved too), whose cost grows with
the catalog, and checks that both decode the same anchors.

``--ab-shared-history`` also times the fast path on the B-fold expanded KV cache (the search before
its beams shared one copy of each history, ``shared_history=False``), alternating with the
default (``fast``, ``expanded-cache``, ``fast#2``, ``expanded-cache#2``), and reports the share of
identical anchor lists; ``--ab-shortcuts`` does the same for the exact shortcuts.

Prints a table (users/s, seconds, peak GPU memory, agreement of the two paths) and writes
``benchmarks/results/anchors_throughput_<model>_<device>.json`` (or ``--out``). Needs torch,
transformers, numpy and pydantic only (no feast, duckdb or pyarrow).

    .venv/bin/python benchmarks/anchors_throughput.py --users 32 --threads 1
    python benchmarks/anchors_throughput.py --model qwen2.5-0.5b-shaped --device cuda \\
        --dtype bfloat16 --users 2048 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedModel, Qwen2ForCausalLM

# The package cannot be pip-installed everywhere the benchmark runs (pyproject pins Python 3.11 and
# pulls feast/duckdb); the anchor modules need only torch, transformers, numpy and pydantic, so
# import them from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.anchors.base_checkpoint import SHAPES
from training.anchors.generate import (
    BeamOutput,
    beam_search_fast,
    beam_search_reference,
    is_out_of_memory,
    search_in_batches,
)
from training.anchors.model import CompactSettings, build_compact_model
from training.anchors.prior import CooccurrencePrior, PriorConfig, SparsePriorRows
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab, build_compact_tokenizer

DEFAULT_REFERENCE_USERS = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_codes(n_items: int, levels: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, size, (n_items, levels))
    # Disambiguation index: rank of each item among those sharing its prefix.
    order = np.lexsort(prefix.T[::-1])
    sorted_prefix = prefix[order]
    new_group = np.any(sorted_prefix[1:] != sorted_prefix[:-1], axis=1)
    starts = np.flatnonzero(np.append(True, new_group))
    group_id = np.cumsum(np.append(True, new_group)) - 1
    rank = np.arange(n_items) - starts[group_id]
    disamb = np.empty(n_items, dtype=np.int64)
    disamb[order] = rank
    return np.column_stack([prefix, disamb])


def build(model_name: str, vocab: SidVocab) -> PreTrainedModel:
    torch.manual_seed(0)
    if model_name == "compact":
        return build_compact_model(CompactSettings(), vocab)
    tok = vocab.tokenizer
    shape = SHAPES["qwen2.5-0.5b"]
    config = shape.config(
        shape.embedding_rows + 64 * ((len(tok) + 63) // 64),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class BatchLog:
    """Wraps a search function and records the batch sizes that succeeded."""

    def __init__(self, search: Callable[[Sequence[Sequence[int]]], BeamOutput]) -> None:
        self.search = search
        self.sizes: list[int] = []

    def __call__(self, prompts: Sequence[Sequence[int]], **kw: Any) -> BeamOutput:
        out = self.search(prompts, **kw)
        self.sizes.append(len(prompts))
        return out


def timed(
    search: Callable[[Sequence[Sequence[int]]], BeamOutput],
    prompts: list[list[int]],
    batch: int,
    warmup: int,
    device: torch.device,
    prior_of: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[BeamOutput, float, int]:
    """Run ``search`` over ``prompts`` after a small warm-up; output, seconds, largest batch."""
    search_in_batches(
        search, prompts[: max(1, min(warmup, batch, len(prompts)))], batch, prior_of=prior_of
    )
    sync(device)
    log = BatchLog(search)
    t0 = time.perf_counter()
    out = search_in_batches(log, prompts, batch, prior_of=prior_of)
    sync(device)
    return out, time.perf_counter() - t0, max(log.sizes)


def agreement(fast: BeamOutput, ref: BeamOutput) -> dict[str, Any]:
    """How far the two paths' anchors agree, over the users both decoded (``ref``'s)."""
    n = len(ref.items)
    a_items, a_lp = fast.items[:n], fast.log_probs[:n]
    same = (a_items == ref.items).all(axis=1)
    overlap = [
        len(set(x[x >= 0].tolist()) & set(y[y >= 0].tolist())) / max(1, int((y >= 0).sum()))
        for x, y in zip(a_items, ref.items, strict=True)
    ]
    finite = np.isfinite(a_lp) & np.isfinite(ref.log_probs)
    return {
        "users_compared": n,
        "identical_anchor_lists": round(float(same.mean()), 4),
        "identical_top1": round(float((a_items[:, 0] == ref.items[:, 0]).mean()), 4),
        "mean_anchor_overlap": round(float(np.mean(overlap)), 4),
        "max_abs_log_prob_diff_identical": float(
            np.abs(a_lp - ref.log_probs)[same[:, None] & finite].max(initial=0.0)
        ),
    }


def one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", choices=["compact", "qwen2.5-0.5b-shaped"], default="compact")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--users", type=int, default=64, help="users for the fast path")
    p.add_argument("--history", type=int, default=50, help="items per history")
    p.add_argument("--beam-width", type=int, default=20)
    p.add_argument("--num-anchors", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="users per batch (both paths)")
    p.add_argument(
        "--reference-users",
        type=int,
        default=None,
        help=f"users for generate(): the first N of --users (default: at most "
        f"{DEFAULT_REFERENCE_USERS})",
    )
    p.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    p.add_argument("--warmup-users", type=int, default=16, help="users of the untimed warm-up")
    p.add_argument("--items", type=int, default=20_000, help="catalog size")
    p.add_argument("--levels", type=int, default=3, help="SID levels before disambiguation")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    p.add_argument(
        "--always-mask",
        action="store_true",
        help="pass the attention mask even to unpadded batches (the fast path before mask_free)",
    )
    p.add_argument(
        "--ab-shortcuts",
        action="store_true",
        help="also time the fast path without its exact shortcuts (the last level always "
        "decoded), alternating: fast, no-shortcuts, fast, no-shortcuts",
    )
    p.add_argument(
        "--ab-shared-history",
        action="store_true",
        help="also time the fast path with the KV cache expanded B-fold after the prefill (the "
        "search before 2026-12-04) instead of one shared history per user, alternating: fast, "
        "expanded-cache, fast, expanded-cache",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prior-weight",
        type=float,
        default=0.0,
        help="also time the fast path with the co-occurrence prior at this weight, interleaved "
        "with the plain fast path (0: not timed)",
    )
    p.add_argument(
        "--prior-dense",
        action="store_true",
        help="with --prior-weight, also time the prior's rows as a dense [batch, items] table "
        "(fast+prior-dense), interleaved with the sparse rows generation uses",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = p.parse_args(argv)
    for name in ("users", "history", "beam_width", "num_anchors", "batch_size", "items"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_anchors > args.beam_width:
        p.error("--num-anchors must be <= --beam-width (anchors are the final beams)")
    if args.reference_users is None:
        args.reference_users = min(args.users, DEFAULT_REFERENCE_USERS)
    args.reference_users = max(1, min(args.reference_users, args.users))
    return args


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    codes = random_codes(args.items, args.levels, args.codebook_size, args.seed)
    sizes = [args.codebook_size] * args.levels + [int(codes[:, -1].max()) + 1]
    vocab = SidVocab.from_tokenizer(build_compact_tokenizer(sizes), sizes)
    trie = SidTrie(codes, sizes)
    try:
        model = build(args.model, vocab).to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"error: the model does not fit on {device}: {one_line(exc)}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed + 1)
    tokens = vocab.item_tokens(codes)
    histories = [rng.integers(0, args.items, args.history) for _ in range(args.users)]
    prompts = [vocab.encode(tokens[h]) for h in histories]
    prior_cfg = PriorConfig()
    prior = CooccurrencePrior.fit(
        histories, np.array([f"i{i}" for i in range(args.items)]), prior_cfg
    )

    def prior_of(rows: np.ndarray) -> SparsePriorRows:
        return prior.sparse_probabilities([histories[i] for i in rows], prior_cfg)

    def prior_dense_of(rows: np.ndarray) -> np.ndarray:
        return prior.probabilities([histories[i] for i in rows], prior_cfg)

    kw = {
        "trie": trie,
        "vocab": vocab,
        "beam_width": args.beam_width,
        "num_anchors": args.num_anchors,
    }

    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, BeamOutput] = {}
    fast: Callable[..., BeamOutput] = partial(beam_search_fast, mask_free=not args.always_mask)
    plans: list[tuple[str, Callable[..., BeamOutput], list[list[int]]]] = [("fast", fast, prompts)]
    if args.prior_weight > 0:
        fused = partial(fast, prior_weight=args.prior_weight)
        rounds = [("fast+prior", fused, prompts)]
        if args.prior_dense:
            rounds.append(("fast+prior-dense", fused, prompts))
        plans += rounds + [("fast#2", fast, prompts)] + [(f"{n}#2", f, ps) for n, f, ps in rounds]
    if args.ab_shortcuts:
        plain = partial(fast, shortcuts=False)
        plans += [("no-shortcuts", plain, prompts), ("fast#2", fast, prompts)]
        plans += [("no-shortcuts#2", plain, prompts)]
    if args.ab_shared_history:
        expanded = partial(fast, shared_history=False)
        # With --ab-shortcuts too, the second fast run is already called fast#2.
        again = "fast#3" if args.ab_shortcuts else "fast#2"
        plans += [("expanded-cache", expanded, prompts), (again, fast, prompts)]
        plans += [("expanded-cache#2", expanded, prompts)]
    if not args.skip_reference:
        plans.append(("generate", beam_search_reference, prompts[: args.reference_users]))
    for name, fn, ps in plans:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row: dict[str, Any] = {"users": len(ps)}
        try:
            out, seconds, largest = timed(
                partial(fn, model, **kw),
                ps,
                args.batch_size,
                args.warmup_users,
                device,
                prior_dense_of
                if name.startswith("fast+prior-dense")
                else prior_of
                if name.startswith("fast+prior")
                else None,
            )
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            row["error"] = f"out of memory even with 1 user per batch: {one_line(exc)}"
            print(
                f"error: {name}: out of {device} memory even with 1 user per batch "
                f"({one_line(exc)}); try fewer --history items or a smaller --beam-width",
                file=sys.stderr,
            )
        else:
            outputs[name] = out
            row |= {
                "seconds": round(seconds, 3),
                "users_per_second": round(len(ps) / seconds, 2),
                "largest_batch": largest,
            }
            if largest < min(args.batch_size, len(ps)):
                print(
                    f"note: {name}: batches of {args.batch_size} ran out of memory; "
                    f"timed with batches of {largest}",
                    file=sys.stderr,
                )
        row["peak_gpu_memory_gb"] = (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None
        )
        rows[name] = row

    agree: dict[str, Any] = {}
    for name in (
        "no-shortcuts",
        "fast#2",
        "no-shortcuts#2",
        "expanded-cache",
        "fast#3",
        "expanded-cache#2",
    ):
        if name in outputs and "fast" in outputs:
            same = agreement(outputs[name], outputs["fast"])
            rows[name]["identical_to_fast"] = same["identical_anchor_lists"]
    for name in ("fast+prior-dense", "fast+prior-dense#2"):
        if name in outputs and "fast+prior" in outputs:
            same = agreement(outputs[name], outputs["fast+prior"])
            rows[name]["identical_to_sparse_prior"] = same["identical_anchor_lists"]
    if "fast" in outputs and "generate" in outputs:
        agree = agreement(outputs["fast"], outputs["generate"])
        agree["speedup"] = round(
            rows["fast"]["users_per_second"] / rows["generate"]["users_per_second"], 2
        )
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "benchmark": "anchors_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_parameters": n_params,
        "codebook_sizes": sizes,
        "prompt_tokens": len(prompts[0]),
        "results": rows,
        "agreement": agree,
    }
    out_path = args.out or (
        Path(__file__).resolve().parent
        / "results"
        / f"anchors_throughput_{args.model}_{device.type}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{args.model} ({n_params / 1e6:.1f}M params, {args.dtype}) "
        f"on {report['machine']['device']} ({torch.get_num_threads()} CPU threads): "
        f"{args.history}-item histories ({len(prompts[0])} tokens), beam {args.beam_width}, "
        f"{args.num_anchors} anchors, {args.items} items, codebooks {sizes}"
    )
    print(f"{'path':<20}{'users':>8}{'batch':>7}{'seconds':>10}{'users/s':>10}{'peak GB':>9}")
    for name, r in rows.items():
        mem = "-" if r["peak_gpu_memory_gb"] is None else f"{r['peak_gpu_memory_gb']:.2f}"
        if "error" in r:
            print(f"{name:<20}{r['users']:>8}  failed: {r['error']}")
            continue
        print(
            f"{name:<20}{r['users']:>8}{r['largest_batch']:>7}{r['seconds']:>10.2f}"
            f"{r['users_per_second']:>10.1f}{mem:>9}"
        )
    for name, r in rows.items():
        if "identical_to_sparse_prior" in r:
            print(f"{name}: {r['identical_to_sparse_prior']:.1%} anchor lists identical to sparse")
    if agree:
        print(
            f"agreement on {agree['users_compared']} users: "
            f"{agree['identical_anchor_lists']:.1%} identical anchor lists, "
            f"{agree['identical_top1']:.1%} identical top-1, "
            f"{agree['mean_anchor_overlap']:.1%} mean overlap, "
            f"max |d log p| {agree['max_abs_log_prob_diff_identical']:.2e} (identical lists); "
            f"speedup x{agree['speedup']}"
        )
    print(f"wrote {out_path}")
    return 2 if any("error" in r for r in rows.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(
            f"error: out of {args.device} memory ({one_line(exc)}): lower --batch-size "
            f"(now {args.batch_size}) or --users",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
