"""Anchor generation over several hosts: shard ``K`` of ``N`` decodes the users hashed to ``K``.

``generation.devices`` spreads one job over the GPUs of one host. A deployment with more users
than one host decodes in its window (the GPL paper labels a day of a large feed's traffic on 96
GPUs) runs ``gpl anchors generate --shard K/N`` on ``N`` hosts, or ``N`` jobs of any scheduler,
each reading the same inputs, then ``gpl anchors merge`` once:

* **Which users**: a user belongs to shard ``blake2b_64(utf-8 user_id) mod N`` (the digest read
  as a little-endian unsigned 64-bit integer). It depends on nothing but the id and ``N``, so
  every host, process and language computes the same split, and each user's sets, whatever their
  cutoffs, are decoded by one shard.
* **Where**: shard ``K`` writes ``RUN_DIR/anchors/shards/KKKKK-of-NNNNN/`` (the stage's file
  and manifest, the shard and a fingerprint of the inputs recorded in it).
* **Merging** checks that all ``N`` shards are there, decoded with the same model, catalog and
  settings (``generation_key``) from the same inputs, that every row sits in its user's shard
  and each file holds the rows its manifest counts; then copies their row groups into
  ``RUN_DIR/anchors/user_interest_anchors.parquet`` (streamed) with a manifest of the summed
  counts. The merged file holds what one process would have written, up to row order.
* **Incremental** shards (``--incremental``) keep rows of the merged output of an earlier day:
  the join of :func:`training.anchors.incremental.plan_reuse` picks only the shard's own sets.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.anchors.errors import AnchorInputError
from training.anchors.schema import ANCHORS_FILE, ANCHORS_SCHEMA, AnchorResult
from training.anchors.sequences import UserCutoffs
from training.io import MANIFEST_NAME, atomic_path, read_manifest, write_manifest

SHARDS_DIR: Final = "shards"
_NAME = re.compile(r"^(\d{5})-of-(\d{5})$")
# Counters of the shards' manifests that add up: their users are disjoint.
_SUMMED: Final = (
    "users",
    "anchor_sets",
    "skipped_empty_history",
    "positives_dropped_unknown_items",
    "sets_with_fewer_anchors",
    "sets_reused",
    "sets_decoded",
)
# What every shard must share: how a set is decoded, and which sets exist.
_SAME: Final = ("generation_key", "inputs_fingerprint")


def shard_of(
    user_ids: pa.Array | pa.ChunkedArray | Sequence[str], count: int
) -> npt.NDArray[np.int64]:
    """Each id's shard among ``count`` (-1 for a null id): ``blake2b_64(utf-8 id) mod count``.

    Hashes each distinct id once (a million distinct ids take ~1 s).
    """
    ids = user_ids if isinstance(user_ids, pa.Array | pa.ChunkedArray) else pa.array(user_ids)
    ids = pc.cast(ids, pa.string())
    distinct = pc.unique(ids).drop_null()
    per_id = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(u.encode("utf-8"), digest_size=8).digest(), "little", signed=False
            )
            % count
            for u in distinct.to_pylist()
        ),
        dtype=np.int64,
        count=len(distinct),
    )
    where = pc.index_in(ids, value_set=distinct)
    if isinstance(where, pa.ChunkedArray):
        where = where.combine_chunks()
    rows = where.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full(len(rows), -1, dtype=np.int64)
    known = rows >= 0
    out[known] = per_id[rows[known]]
    return out


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``index`` from 0).

    Raises:
        AnchorInputError: for a count below 1 or an index outside ``[0, count)``.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise AnchorInputError(f"shard {self.index}/{self.count}: the count must be >= 1")
        if not 0 <= self.index < self.count:
            raise AnchorInputError(
                f"shard {self.index}/{self.count}: the index must be in 0..{self.count - 1} "
                "(shards are numbered from 0)"
            )
        if self.count > 99_999:
            raise AnchorInputError(f"shard count {self.count}: at most 99,999 shards")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``"K/N"``: shard ``K`` (from 0) of ``N``, as ``--shard`` takes it."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise AnchorInputError(
                f"--shard {text!r}: give K/N, shard K (from 0) of N, e.g. 0/4 ... 3/4"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        """The shard's folder name, ``KKKKK-of-NNNNN`` (sorts in shard order)."""
        return f"{self.index:05d}-of-{self.count:05d}"

    def directory(self, out_dir: Path) -> Path:
        """Where the shard writes its file and manifest: ``out_dir/shards/<name>``."""
        return out_dir / SHARDS_DIR / self.name

    def restrict(
        self,
        positives: pa.Table,
        cutoffs: Sequence[datetime] | UserCutoffs,
        users: Sequence[str] | None,
    ) -> tuple[pa.Table, Sequence[datetime] | UserCutoffs, list[str] | None]:
        """A job's inputs cut to this shard's users.

        Each distinct id of the three is hashed once (the hash is a Python call per id), then
        every input keeps its rows by a set lookup.
        """
        ids: list[pa.Array | pa.ChunkedArray] = [pc.cast(positives.column("user_id"), pa.string())]
        if isinstance(cutoffs, UserCutoffs):
            ids.append(pa.array(cutoffs.user_ids.tolist(), pa.string()))
        if users is not None:
            ids.append(pa.array(list(users), pa.string()))
        distinct = pc.unique(pa.chunked_array([c for a in ids for c in _chunks(a)], pa.string()))
        mine = pc.filter(distinct, pa.array(shard_of(distinct, self.count) == self.index))

        def keep(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
            return pc.is_in(values, value_set=mine)

        positives = positives.filter(keep(ids[0]))
        if isinstance(cutoffs, UserCutoffs):
            cutoffs = cutoffs.subset(keep(ids[1]).to_numpy(zero_copy_only=False))
        kept_users = None if users is None else pc.filter(ids[-1], keep(ids[-1])).to_pylist()
        return positives, cutoffs, kept_users


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(values.chunks) if isinstance(values, pa.ChunkedArray) else [values]


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finalizer, elementwise: a well-spread 64-bit value per input (wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _ranks(ids: pa.ChunkedArray | pa.Array, digest: Any) -> npt.NDArray[np.uint64]:
    """Each id's rank among the sorted distinct ids (nulls: 2**64 - 1); the ids go in ``digest``."""
    ids = pc.cast(ids, pa.large_string())
    unique = pc.unique(ids).drop_null()
    values = pc.take(unique, pc.sort_indices(unique))
    # All ids joined in Arrow (one buffer, no Python string per id).
    joined = pc.binary_join(
        pa.LargeListArray.from_arrays([0, len(values)], values), pa.scalar("\0", pa.large_string())
    )[0]
    digest.update(joined.as_buffer() or b"")
    where = pc.index_in(ids, value_set=values)
    if isinstance(where, pa.ChunkedArray):
        where = where.combine_chunks()
    ranks = where.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return ranks.astype(np.uint64)  # -1 wraps to 2**64 - 1


def _rows_sum(*columns: npt.NDArray[np.uint64]) -> int:
    """An order-free digest of rows: the wrapping sum of each row's mixed columns."""
    acc = np.zeros(len(columns[0]), np.uint64)
    for k, col in enumerate(columns):
        salt = np.uint64(((k + 1) * 0x9E3779B97F4A7C15) % 2**64)  # one constant per column
        acc = _mix(acc ^ (col + salt))
    return int(acc.sum(dtype=np.uint64))


def inputs_fingerprint(
    positives: pa.Table, cutoffs: Sequence[datetime] | UserCutoffs, users: Sequence[str] | None
) -> str:
    """A fingerprint of a job's whole inputs (before sharding), for merge to compare.

    Every positive's (user, item, time), every cutoff's (user, time) and the users asked for:
    a log that gained, lost, moved or changed a row changes it. Order-free (each row is mixed
    to 64 bits and the rows summed), so hosts that read the same rows in another order agree.
    """
    digest = hashlib.sha256()
    ts = pc.cast(positives.column("event_timestamp"), pa.timestamp("us", "UTC"))
    micros = pc.cast(ts, pa.int64()).fill_null(0).to_numpy().astype(np.uint64)
    user_rank = _ranks(positives.column("user_id"), digest)
    item_rank = _ranks(positives.column("item_id"), digest)
    rows = _rows_sum(user_rank, item_rank, micros)
    digest.update(f"positives:{positives.num_rows}:{rows}".encode())
    if isinstance(cutoffs, UserCutoffs):
        owner = np.repeat(np.arange(len(cutoffs.user_ids)), np.diff(cutoffs.offsets))
        for u in cutoffs.user_ids.tolist():
            digest.update(u.encode("utf-8") + b"\0")
        pairs = _rows_sum(owner.astype(np.uint64), cutoffs.cutoffs.astype(np.uint64))
        digest.update(f"user cutoffs:{len(cutoffs.cutoffs)}:{pairs}".encode())
    else:
        cuts = sorted({c.isoformat() for c in cutoffs})
        digest.update(("shared cutoffs:" + ",".join(cuts)).encode())
    if users is not None:
        digest.update(b"users:")
        for u in sorted(set(users)):
            digest.update(u.encode("utf-8") + b"\0")
    return digest.hexdigest()[:32]


def _found_shards(out_dir: Path, count: int | None) -> tuple[int, list[Path]]:
    """The shard folders of ``count`` (or of the only count present) under ``out_dir``."""
    root = out_dir / SHARDS_DIR
    by_count: dict[int, dict[int, Path]] = {}
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        match = _NAME.match(d.name)
        if match is not None and d.is_dir():
            by_count.setdefault(int(match.group(2)), {})[int(match.group(1))] = d
    if not by_count:
        raise AnchorInputError(
            f"no shard outputs under {root}: run `gpl anchors generate --shard K/N` for every "
            "K first"
        )
    if count is None:
        if len(by_count) > 1:
            raise AnchorInputError(
                f"{root} holds shards of {len(by_count)} different counts "
                f"({', '.join(str(n) for n in sorted(by_count))}): say which with --shards N "
                "(or remove the stale folders)"
            )
        count = next(iter(by_count))
    found = by_count.get(count, {})
    missing = sorted(set(range(count)) - set(found))
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        others = sorted(n for n in by_count if n != count)
        raise AnchorInputError(
            f"{len(missing)} of {count} shards missing under {root}: {shown}; run `gpl anchors "
            f"generate --shard K/{count}` for each"
            + (f" (found shards of {', '.join(map(str, others))})" if others else "")
        )
    return count, [found[k] for k in range(count)]


def _shard_manifest(directory: Path, index: int, count: int) -> dict[str, Any]:
    path = directory / ANCHORS_FILE
    if not (directory / MANIFEST_NAME).exists() or not path.exists():
        raise AnchorInputError(
            f"{directory}: shard {index}/{count} has not finished (no manifest or no "
            f"{ANCHORS_FILE}); run or re-run `gpl anchors generate --shard {index}/{count}`"
        )
    try:
        manifest = read_manifest(directory)
        rows = pq.ParquetFile(path).metadata.num_rows
        schema = pq.read_schema(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError, ArrowInvalid: half-copied files
        raise AnchorInputError(
            f"{directory}: shard {index}/{count} is unreadable ({exc}); re-run or re-copy it"
        ) from exc
    metrics = manifest.get("metrics", {}) if isinstance(manifest, dict) else {}
    if metrics.get("shard") != {"index": index, "count": count}:
        raise AnchorInputError(
            f"{directory}: its manifest records shard {metrics.get('shard')}, not {index}/{count}"
        )
    if rows != metrics.get("anchor_sets"):
        raise AnchorInputError(
            f"{path}: {rows} rows but its manifest counts {metrics.get('anchor_sets')} sets (a "
            "run overwrote it half way?); re-run the shard"
        )
    if not schema.equals(ANCHORS_SCHEMA):
        raise AnchorInputError(f"{path}: not the anchors schema (written by another version?)")
    return manifest


def merge_anchor_shards(
    out_dir: Path, *, count: int | None = None, remove: bool = False
) -> AnchorResult:
    """Merge ``out_dir/shards/*`` into ``out_dir/user_interest_anchors.parquet`` and a manifest.

    Args:
        out_dir: The stage folder the shards wrote under, ``RUN_DIR/anchors``.
        count: The number of shards to merge; inferred when only one count is present.
        remove: Delete the shard folders once the merged file and manifest are written.

    Raises:
        AnchorInputError: a shard missing or unfinished, shards decoded with another model,
            catalog, setting or inputs, or a row outside its user's shard.
    """
    t0 = time.perf_counter()
    count, dirs = _found_shards(out_dir, count)
    manifests = [_shard_manifest(d, k, count) for k, d in enumerate(dirs)]
    first = manifests[0]["metrics"]
    for k, m in enumerate(manifests[1:], start=1):
        for name in _SAME:
            if m["metrics"].get(name) != first.get(name):
                raise AnchorInputError(
                    f"shard {k}/{count} differs from shard 0 in {name} ({dirs[k]}): "
                    + {
                        "generation_key": "another model, catalog or generation setting",
                        "inputs_fingerprint": "another request log, positives or cutoffs",
                    }[name]
                    + "; re-run the shards that are stale"
                )
    cutoffs: list[npt.NDArray[np.int64]] = []
    with (
        atomic_path(out_dir / ANCHORS_FILE) as tmp,
        pq.ParquetWriter(tmp, ANCHORS_SCHEMA, compression="zstd") as writer,
    ):
        for k, d in enumerate(dirs):
            source = pq.ParquetFile(d / ANCHORS_FILE)
            for g in range(source.num_row_groups):
                try:
                    group = source.read_row_group(g)
                except (OSError, ValueError) as exc:  # a corrupt page past the footer
                    raise AnchorInputError(
                        f"{d / ANCHORS_FILE}: row group {g} is unreadable ({exc}); re-run or "
                        f"re-copy shard {k}/{count}"
                    ) from exc
                if not (shard_of(group.column("user_id"), count) == k).all():
                    raise AnchorInputError(
                        f"{d / ANCHORS_FILE}: rows of users outside shard {k}/{count}"
                    )
                cutoffs.append(
                    pc.unique(group.column("event_timestamp").cast(pa.int64())).to_numpy()
                )
                writer.write_table(group)
    metrics: dict[str, Any] = {
        name: sum(int(m["metrics"].get(name) or 0) for m in manifests) for name in _SUMMED
    }
    n_sets = metrics["anchor_sets"]
    gen_seconds = [float(m["metrics"].get("generation_seconds") or 0.0) for m in manifests]
    metrics.update(
        {
            "cutoffs": len(np.unique(np.concatenate(cutoffs))) if cutoffs else 0,
            "mean_history_length": round(
                sum(
                    m["metrics"]["mean_history_length"] * m["metrics"]["anchor_sets"]
                    for m in manifests
                )
                / n_sets,
                3,
            )
            if n_sets
            else 0.0,
            "shards": count,
            # Per-shard decoding summed: the device time the sets cost, not the wall time of
            # shards that ran side by side.
            "generation_seconds": round(sum(gen_seconds), 3),
            "users_per_second": round(metrics["sets_decoded"] / sum(gen_seconds), 2)
            if sum(gen_seconds) > 0
            else None,
            "shard_runs": [
                {
                    "shard": k,
                    "device": m["metrics"].get("device"),
                    "anchor_sets": m["metrics"].get("anchor_sets"),
                    "sets_decoded": m["metrics"].get("sets_decoded"),
                    "generation_seconds": m["metrics"].get("generation_seconds"),
                    "seconds": m["metrics"].get("seconds"),
                }
                for k, m in enumerate(manifests)
            ],
        }
    )
    for name in (
        "generation_key",
        "inputs_fingerprint",
        "dtype",
        "implementation",
        "ensemble_members",
        "prior_weight",
        "eval_hr@10",
    ):
        metrics[name] = first.get(name)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_manifest(
        out_dir,
        "anchors",
        inputs={"shards": [str(d.relative_to(out_dir)) for d in dirs]},
        outputs={"user_interest_anchors": ANCHORS_FILE},
        config=manifests[0]["config"],
        metrics=metrics,
    )
    if remove:
        for d in dirs:
            shutil.rmtree(d)
        if not any((out_dir / SHARDS_DIR).iterdir()):
            (out_dir / SHARDS_DIR).rmdir()
    return AnchorResult(path=out_dir / ANCHORS_FILE, metrics=metrics)
