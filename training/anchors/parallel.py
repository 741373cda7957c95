"""Anchor decoding on several devices at once: one worker process per device.

``generation.devices`` (e.g. ``[cuda:0, cuda:1]``) starts one spawned process per entry. Each
loads the anchor models onto its device once, then takes *tasks* off a shared queue: a few
batches' worth of prompts, cut from a chunk of the job after sorting it by prompt length, which
is how :func:`training.anchors.generate.search_in_batches` batches it in one process. A task's
batches are therefore exactly those a single process would decode, and the anchors are the same;
only which device decodes which batch changes. A device that finishes early takes the next task,
so faster devices do more. The job keeps at most two chunks of tasks in flight, so the next
chunk's tasks are queued while the current one is collected and written, and memory stays
bounded by the chunk size.

Workers are spawned (never forked: CUDA cannot be re-initialized in a forked child), and each
worker gets an equal share of the CPU's threads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from training.anchors.errors import AnchorInputError
from training.anchors.generate import (
    BatchSize,
    BeamOutput,
    GenerateConfig,
    SearchFn,
    exclusions_of,
    make_search,
    resolve_dtype,
    search_in_batches,
)
from training.anchors.prior import CooccurrencePrior, PriorConfig
from training.anchors.trie import SidTrie

logger = logging.getLogger(__name__)

#: Batches per task: small enough that devices finishing at different speeds even out within a
#: chunk, large enough that a task's pickling and queueing are negligible next to its decoding.
BATCHES_PER_TASK = 4


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build the job's beam search (pickled once per worker).

    Attributes:
        model_dirs: The anchor model directories (several: an ensemble), already validated.
        codes: The catalog's SID codes, ``[n_items, levels]`` (the trie is built from them).
        generation: Beam width, anchors, implementation, dtype and batch size.
        prior: The co-occurrence prior, aligned to the catalog, or None.
        prior_weight: Its fusion weight (0: the prior is not used).
        prior_config: Decay, history length and smoothing of its rows.
    """

    model_dirs: list[Path]
    codes: npt.NDArray[np.int64]
    generation: GenerateConfig
    prior: CooccurrencePrior | None
    prior_weight: float
    prior_config: PriorConfig


@dataclass
class _Worker:
    search: SearchFn
    batch_size: BatchSize  # shared by the worker's tasks: an out-of-memory halving lasts
    spec: WorkerSpec


_WORKER: _Worker | None = None


def _start_worker(counter: Any, devices: list[str], spec: WorkerSpec, cpu_threads: int) -> None:
    """Process initializer: take the next device of ``devices`` and load the models onto it."""
    from training.anchors.model import load_anchor_model

    global _WORKER
    with counter.get_lock():
        device = torch.device(devices[counter.value])
        counter.value += 1
    # Every worker's share of the CPU's threads, on a GPU too: the search's host-side work would
    # otherwise run as many threads per worker as there are cores.
    torch.set_num_threads(cpu_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(spec.generation.dtype, device)
    members = [load_anchor_model(d, device=device, dtype=dtype) for d in spec.model_dirs]
    vocab = members[0].vocab
    models = members[0].model if len(members) == 1 else [m.model for m in members]
    trie = SidTrie(spec.codes, vocab.codebook_sizes)
    search = make_search(models, trie, vocab, spec.generation, spec.prior_weight)
    _WORKER = _Worker(search, BatchSize(spec.generation.batch_size_on(device)), spec)


def _ready() -> None:
    """A no-op task: returns once the worker running it has started."""
    assert _WORKER is not None, "worker not started"


def _decode(prompts: list[list[int]], histories: list[npt.NDArray[np.int64]] | None) -> BeamOutput:
    """One task in a worker: its prompts in batches (already sorted by length)."""
    assert _WORKER is not None, "worker not started"
    spec = _WORKER.spec
    prior_of, exclude_of = None, None
    # Histories are sent only when the prior is fused or the users' own items are excluded.
    if spec.prior is not None and spec.prior_weight > 0 and histories is not None:
        prior_of = partial(spec.prior.rows_for, histories, spec.prior_config)
    if spec.generation.exclude_history and histories is not None:
        exclude_of = exclusions_of(histories, len(spec.codes))
    return search_in_batches(
        _WORKER.search, prompts, _WORKER.batch_size, prior_of=prior_of, exclude_of=exclude_of
    )


class DevicePool:
    """Worker processes, one per device, decoding chunks of prompts as tasks.

    Use as a context manager; :meth:`decode_chunks` yields each chunk's beams in order.
    """

    def __init__(self, devices: Sequence[torch.device], spec: WorkerSpec) -> None:
        self.devices = [str(d) for d in devices]
        self.spec = spec
        # Every worker's batch size, for task sizes: the smallest, so no task splits a batch.
        self.batch_size = min(spec.generation.batch_size_on(d) for d in devices)
        threads = max(1, torch.get_num_threads() // len(devices))
        ctx = mp.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=len(self.devices),
            mp_context=ctx,
            initializer=_start_worker,
            initargs=(ctx.Value("i", 0), self.devices, spec, threads),
        )

        # One no-op task per worker: spawning starts now (every worker at once), and each
        # one's completion says when that worker had loaded its models.
        self._t0 = time.perf_counter()
        self._started: list[float] = []
        for _ in self.devices:
            self._pool.submit(_ready).add_done_callback(self._note_start)

    def _note_start(self, future: Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._started.append(time.perf_counter() - self._t0)

    def start_seconds(self) -> float | None:
        """Seconds from creating the pool until its last worker had loaded the models."""
        return round(max(self._started), 3) if self._started else None

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(
        self,
        prompts: list[list[int]],
        histories: Sequence[npt.NDArray[np.int64]],
        progress: Callable[[int], object] | None,
    ) -> list[tuple[npt.NDArray[np.int64], Future[BeamOutput]]]:
        """Queue one chunk's tasks: its prompts sorted by length, cut at whole batches."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        size = self.batch_size * BATCHES_PER_TASK
        with_histories = (
            self.spec.prior is not None and self.spec.prior_weight > 0
        ) or self.spec.generation.exclude_history
        tasks = []
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            future = self._pool.submit(
                _decode,
                [prompts[i] for i in rows],
                [histories[i] for i in rows] if with_histories else None,
            )
            if progress is not None:
                future.add_done_callback(partial(_report, progress, len(rows)))
            tasks.append((rows, future))
        return tasks

    def decode_chunks(
        self,
        chunks: Iterator[tuple[list[list[int]], Sequence[npt.NDArray[np.int64]]]],
        progress: Callable[[int], object] | None = None,
    ) -> Iterator[BeamOutput]:
        """Beams of each ``(prompts, histories)`` chunk, in order, two chunks in flight.

        Raises:
            AnchorInputError: when a worker failed to start (its models did not load, its
                device cannot be used) or died (killed, e.g. out of host memory).
        """
        pending: list[tuple[int, list[tuple[npt.NDArray[np.int64], Future[BeamOutput]]]]] = []
        try:
            for prompts, histories in chunks:
                pending.append((len(prompts), self._submit(prompts, histories, progress)))
                if len(pending) == 2:
                    yield _collect(*pending.pop(0))
            while pending:
                yield _collect(*pending.pop(0))
        except BrokenProcessPool as exc:
            raise AnchorInputError(
                f"a generation worker process ({', '.join(self.devices)}) failed to start or "
                "died: its error, if it had time to print one, is above (a device that cannot "
                "be used, a model that does not load); without one it was killed, e.g. out of "
                "host memory: lower generation.chunk_sets or use fewer devices"
            ) from exc


def _report(progress: Callable[[int], object], n: int, future: Future[BeamOutput]) -> None:
    if not future.cancelled() and future.exception() is None:
        progress(n)


def _collect(n: int, tasks: list[tuple[npt.NDArray[np.int64], Future[BeamOutput]]]) -> BeamOutput:
    """One chunk's beams in its input order, from its tasks' results."""
    parts = [(rows, future.result()) for rows, future in tasks]
    width = max(out.items.shape[1] for _, out in parts)
    items = np.full((n, width), -1, np.int64)
    log_probs = np.full((n, width), -np.inf, np.float32)
    for rows, out in parts:
        items[rows, : out.items.shape[1]] = out.items
        log_probs[rows, : out.log_probs.shape[1]] = out.log_probs
    return BeamOutput(items=items, log_probs=log_probs)
