"""Decoding on several devices: worker processes give the anchors one process gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.training.anchors.conftest import assert_same_anchors, tiny_config
from training.anchors.errors import AnchorInputError
from training.anchors.generate import GenerateConfig
from training.anchors.job import generate_anchors
from training.anchors.parallel import DevicePool, WorkerSpec
from training.anchors.prior import PriorConfig
from training.anchors.sequences import day_cutoffs


def test_two_workers_write_the_table_one_process_writes(tmp_path, toy_data, trained_compact):
    """Two CPU workers, the prior fused, chunks of 7 sets in tasks of 4 x 2 prompts (so chunks
    overlap in flight and tasks come back out of order): the same rows and anchors as in one
    process, the progress bar counting every set once."""
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    cfg = tiny_config()
    cfg.generation.device = "cpu"  # 'auto' would decode on a GPU where there is one (bf16)
    cfg.generation.chunk_sets = 7
    cfg.generation.batch_size = 2
    cfg.prior.weight = 1.0
    one = generate_anchors(semantics, positives, cutoffs, model, cfg, tmp_path / "one")
    cfg.generation.devices = ["cpu", "cpu"]
    cfg.training.progress = True
    two = generate_anchors(semantics, positives, cutoffs, model, cfg, tmp_path / "two")
    assert one.table.num_rows > 14
    assert_same_anchors(one.table, two.table)
    assert two.metrics["device"] == "cpu, cpu" and two.metrics["batch_size"] == [2, 2]
    assert two.metrics["dtype"] == "float32"
    assert two.metrics["prior_weight"] == 1.0
    assert two.metrics["worker_start_seconds"] > 0 and one.metrics["worker_start_seconds"] is None
    assert two.metrics["anchor_sets"] == one.metrics["anchor_sets"]


def test_two_workers_leave_the_users_own_items_out_as_one_process_does(
    tmp_path, toy_data, trained_compact
):
    """No prior fused, so the histories travel to the workers for the exclusion alone."""
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    cfg = tiny_config()
    cfg.generation.device = "cpu"
    cfg.generation.batch_size = 4
    cfg.generation.exclude_history = True
    model = trained_compact.model_dir
    one = generate_anchors(semantics, positives, cutoffs, model, cfg, tmp_path / "one")
    cfg.generation.devices = ["cpu", "cpu"]
    two = generate_anchors(semantics, positives, cutoffs, model, cfg, tmp_path / "two")
    assert_same_anchors(one.table, two.table)
    cfg.generation.devices = None
    cfg.generation.exclude_history = False
    plain = generate_anchors(semantics, positives, cutoffs, model, cfg, tmp_path / "plain")
    assert (
        plain.table.column("anchor_item_ids").to_pylist()
        != two.table.column("anchor_item_ids").to_pylist()
    )


def test_devices_are_checked() -> None:
    for bad in ([], ["auto"], ["tpu:0"], "some"):
        with pytest.raises(ValidationError):
            GenerateConfig(devices=bad)
    assert GenerateConfig(devices=["cpu", "cpu"]).worker_devices() == [torch.device("cpu")] * 2
    assert GenerateConfig().worker_devices() is None
    if torch.cuda.device_count() == 0:
        with pytest.raises(AnchorInputError, match="no CUDA device is visible"):
            GenerateConfig(devices="all").worker_devices()
    n = torch.cuda.device_count()
    with pytest.raises(AnchorInputError, match=f"cuda:{n} is not visible"):
        GenerateConfig(devices=[f"cuda:{n}"]).worker_devices()


def test_a_worker_that_cannot_start_is_one_clear_error(tmp_path) -> None:
    """A worker whose models do not load (here: not there) breaks the pool: AnchorInputError."""
    spec = WorkerSpec(
        [tmp_path / "missing"],
        np.zeros((3, 3), np.int64),
        GenerateConfig(),
        None,
        0.0,
        PriorConfig(),
    )
    with (
        DevicePool([torch.device("cpu")], spec) as pool,
        pytest.raises(AnchorInputError, match="failed to start or died"),
    ):
        list(pool.decode_chunks(iter([([[1, 2]], [np.zeros(1, np.int64)])])))
    assert pool.start_seconds() is None
