"""The `gpl` command line: the pipeline verbs, clear errors and exit code 2 on bad input."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from gpl_service.cli import app
from tests.factories import make_requests, write_empty_anchors
from training.io import read_manifest
from training.preranker.job import time_quantile

runner = CliRunner()

SMALL_FUNNEL = """\
seed: 1
requests_per_user: 2
retrieval_size: 60
prerank_size: 30
rank_size: 15
exposed_size: 5
progress: false
"""


def gpl(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_help_teaches_the_pipeline() -> None:
    code, out = gpl("--help")
    assert code == 0
    for verb in ("data", "features", "pseudo-labels", "demo"):
        assert verb in out
    # The verb table keeps one stage per line (click would re-wrap it into one paragraph).
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("gpl sids train | sids assign") for line in lines), out
    assert any(line.startswith("gpl demo ") for line in lines), out
    code, out = gpl("features", "apply", "--help")
    assert code == 0 and "GPL_REDIS_URL" in out


def test_help_lists_the_verbs_in_pipeline_order() -> None:
    code, out = gpl("--help")
    assert code == 0
    listed = re.findall(r"^  ([a-z-]+)  ", out.split("Commands:")[1], flags=re.MULTILINE)
    from gpl_service.cli import _PIPELINE_ORDER

    assert listed == list(_PIPELINE_ORDER)
    assert listed[:5] == ["data", "sids", "anchors", "pseudo-labels", "features"]
    assert (
        listed.index("train")
        < listed.index("evaluate")
        < listed.index("export")
        < listed.index("serve")
    )


def test_errors_name_the_option_the_user_typed(tmp_path: Path) -> None:
    """A bad value from the command line is reported under its flag, not the setting's key;
    one from a config file keeps the key (the user typed no flag for it)."""
    code, out = gpl("data", "synth", "--run-dir", str(tmp_path), "--n-items", "0")
    assert code == 2
    assert "error: --n-items: Input should be greater than or equal to 1" in out, out
    code, out = gpl("anchors", "train", "--run-dir", str(tmp_path), "--epochs", "0")
    assert code == 2
    assert "error: --epochs (training.epochs): Input should be greater" in out, out
    config = tmp_path / "synth.yaml"
    config.write_text("n_items: 0\n")
    code, out = gpl("data", "synth", "--run-dir", str(tmp_path), "--config", str(config))
    assert code == 2
    assert "error: n_items: Input should be greater than or equal to 1" in out, out


TIME_OPTIONS = [
    ("features", "materialize", "--end"),
    ("sids", "train", "--collaborative-until"),
    ("anchors", "train", "--until"),
    ("pseudo-labels", "--calibrate-until"),
    ("train", "--until"),
    ("evaluate", "--since"),
    ("serve", "--as-of"),
]


@pytest.mark.parametrize("command", TIME_OPTIONS, ids=lambda c: c[-1])
def test_every_time_option_takes_the_same_formats(tmp_path: Path, command: tuple[str, ...]) -> None:
    """`serve --as-of` once took two formats, the other time options three others: every one
    now takes a date, a time with "T" or a space, and an ISO time with an offset."""
    for moment in (
        "2024-03-01",
        "2024-03-01T12:30:00",
        "2024-03-01 12:30:00",
        "2024-03-01T14:30:00+0200",
    ):
        # An empty run directory: the command parses its options, then stops at its missing input.
        code, out = gpl(*command, moment, "--run-dir", str(tmp_path))
        assert "Invalid value" not in out, (moment, out)
        assert code == 2, out
    code, out = gpl(*command, "01/03/2024", "--run-dir", str(tmp_path))
    assert code == 2 and f"Invalid value for '{command[-1]}'" in out, out


def test_validate_reports_every_problem_capped_at_20(tmp_path: Path) -> None:
    rows = make_requests(n_requests=3, n_users=2, n_items=40).to_pylist()
    for k, row in enumerate(rows):
        row["stage"] = f"bogus{k % 2}"  # the group/stage cross-check fails on every row too
        row["label"] = 1
        row["request_id"] = "" if k < 25 else row["request_id"]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    code, out = gpl("data", "validate", "requests", str(path))
    assert code == 2
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert 2 <= len(lines) <= 21
    assert any("empty ids" in line for line in lines)
    assert any("unknown values" in line for line in lines)


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.parquet"
    pq.write_table(make_requests(n_requests=3, n_users=2, n_items=40), path)
    code, out = gpl("data", "validate", "requests", str(path))
    assert code == 0 and "valid requests table" in out


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    code, out = gpl("features", "build", "--run-dir", str(tmp_path))
    assert code == 2
    assert "no such file" in out


def test_bad_config_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("n_items: -5\nunknown_field: 1\n")
    code, out = gpl("data", "synth", "--run-dir", str(tmp_path / "run"), "--config", str(cfg))
    assert code == 2
    assert "n_items" in out and "unknown_field" in out
    assert not (tmp_path / "run" / "data").exists()


def test_anchor_config_errors_name_the_setting(tmp_path: Path) -> None:
    """The file and the command-line values are validated together, before any data is read."""
    cfg = tmp_path / "anchors.yaml"
    run = str(tmp_path / "run")  # holds nothing: validation comes first
    cfg.write_text("training: 5\n")
    code, out = gpl("anchors", "train", "--run-dir", run, "--config", str(cfg), "--epochs", "2")
    assert code == 2 and "training must be a mapping" in out
    cfg.write_text("training: {epochs: 0}\nmodel: {text_prefix: 'Liked:'}\n")
    code, out = gpl("anchors", "train", "--run-dir", run, "--config", str(cfg))
    assert code == 2 and "epochs" in out and "text_prefix needs base_model_path" in out
    # With the checkpoint on the command line the prefix is fine; the epochs still are not.
    code, out = gpl(
        "anchors", "train", "--run-dir", run, "--config", str(cfg), "--base-model", "/nowhere"
    )
    assert code == 2 and "epochs" in out and "text_prefix" not in out


def test_bad_input_leaves_no_partial_output(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        gpl("data", "synth", "--run-dir", str(run), "--n-items", "120", "--n-users", "40")[0] == 0
    )
    # Corrupt the catalog: the simulator must refuse it and write nothing.
    items = pq.read_table(run / "data" / "items.parquet").to_pylist()
    items[0]["text"] = ""
    items[1]["item_id"] = items[2]["item_id"]
    pq.write_table(pa.Table.from_pylist(items), run / "data" / "items.parquet")
    code, out = gpl("data", "simulate", "--run-dir", str(run))
    assert code == 2
    assert "empty texts" in out and "duplicate (item_id)" in out
    assert not (run / "funnel").exists() or not any((run / "funnel").iterdir())


@pytest.mark.slow
def test_pipeline_verbs_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "funnel.yaml"
    cfg.write_text(SMALL_FUNNEL)
    steps = [
        ("data", "synth", "--run-dir", str(run), "--n-items", "150", "--n-users", "40"),
        ("data", "simulate", "--run-dir", str(run), "--config", str(cfg)),
        ("features", "build", "--run-dir", str(run)),
        ("features", "apply", "--run-dir", str(run)),
        ("features", "materialize", "--run-dir", str(run), "--full"),
    ]
    for step in steps:
        code, out = gpl(*step)
        assert code == 0, (step, out)
    # The preranker service reads the anchor stage's output: without it, one clear line.
    code, out = gpl("features", "training-set", "--run-dir", str(run))
    assert code == 2 and "user_interest_anchors.parquet" in out and "run the stage" in out
    write_empty_anchors(run)
    code, out = gpl("features", "training-set", "--run-dir", str(run))
    assert code == 0, out
    requests = pq.read_table(run / "funnel" / "requests.parquet")
    training = pq.read_table(run / "training_set" / "training_set.parquet")
    assert training.num_rows == requests.num_rows
    for manifest in ("data", "funnel", "features", "training_set"):
        assert (run / manifest / "manifest.json").exists(), manifest
    assert (run / "feature_store.yaml").exists()
    code, out = gpl("features", "training-set", "--run-dir", str(run), "--service", "nope")
    assert code == 2, out
    assert "no feature service 'nope'; the registry has: preranker, training_labels" in out, out


TINY_ANCHORS = """\
model:
  compact: {hidden_size: 16, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 32}
"""
TINY_TRAINING = """\
training: {epochs: 1, batch_size: 32, eval_users: 8, progress: false, device: cpu}
sequences: {max_history: 8}
generation: {beam_width: 6, num_anchors: 4, device: cpu}
"""


@pytest.fixture(scope="module")
def sids_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic run up to its SIDs (copied by each test that trains anchors on it)."""
    root = tmp_path_factory.mktemp("sids_run")
    run = root / "run"
    funnel, sids = root / "funnel.yaml", root / "sids.yaml"
    funnel.write_text(SMALL_FUNNEL)
    sids.write_text("method: rkmeans\ncodebook_size: 16\nshow_progress: false\n")
    steps = [
        ("data", "synth", "--run-dir", str(run), "--n-items", "150", "--n-users", "40"),
        ("data", "simulate", "--run-dir", str(run), "--config", str(funnel)),
        ("sids", "train", "--run-dir", str(run), "--config", str(sids)),
    ]
    for step in steps:
        code, out = gpl(*step)
        assert code == 0, (step, out)
    return run


def _train_and_generate(run: Path, anchors: Path, *train_flags: str) -> list[str]:
    outputs = []
    for step in (
        ("anchors", "train", "--run-dir", str(run), "--config", str(anchors), *train_flags),
        ("anchors", "generate", "--run-dir", str(run), "--config", str(anchors)),
    ):
        code, out = gpl(*step)
        assert code == 0, (step, out)
        outputs.append(out)
    return outputs


def test_anchor_ensemble_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`gpl anchors train --ensemble-size 2` writes two members; `generate` decodes both."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    train_out, _ = _train_and_generate(run, anchors, "--ensemble-size", "2")
    assert "ensemble_eval_hr@10" in train_out
    model = run / "anchors" / "model"
    assert (model / "members" / "1" / "anchor_model.json").exists()
    manifest = json.loads((run / "anchors" / "manifest.json").read_text())
    assert manifest["metrics"]["ensemble_members"] == 2
    anchors_file = run / "anchors" / "user_interest_anchors.parquet"
    one = pq.read_table(anchors_file)
    assert one.num_rows > 0
    # The same ensemble decoded by two worker processes (--devices): the same anchors.
    gen = ("anchors", "generate", "--run-dir", str(run), "--config", str(anchors))
    code, out = gpl(*gen, "--devices", "cpu, cpu")
    assert code == 0, out
    two = pq.read_table(anchors_file)
    assert two.column("anchor_item_ids").equals(one.column("anchor_item_ids"))
    assert json.loads((run / "anchors" / "manifest.json").read_text())["metrics"]["device"] == (
        "cpu, cpu"
    )
    # Again, incremental: every set is reused from the file just written.
    code, out = gpl(*gen, "--incremental")
    assert code == 0 and f"sets_reused: {one.num_rows}" in out and "sets_decoded: 0" in out, out
    if not torch.cuda.is_available():
        code, out = gpl(*gen, "--devices", "all")
        assert code == 2 and "no CUDA device is visible" in out and "Traceback" not in out, out


def test_sharded_generation_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`generate --shard K/N` for every K, then `merge`: the one-process file, up to row order."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    _train_and_generate(run, anchors)
    anchors_file = run / "anchors" / "user_interest_anchors.parquet"
    keys = [("user_id", "ascending"), ("event_timestamp", "ascending")]
    one = pq.read_table(anchors_file).sort_by(keys)
    anchors_file.unlink()
    gen = ("anchors", "generate", "--run-dir", str(run), "--config", str(anchors))
    for k in range(2):
        code, out = gpl(*gen, "--shard", f"{k}/2")
        assert code == 0 and f"shard {k}/2 done" in out and "gpl anchors merge" in out, out
    assert not anchors_file.exists()
    code, out = gpl("anchors", "merge", "--run-dir", str(run), "--shards", "3")
    assert code == 2 and "3 of 3 shards missing" in out and "found shards of 2" in out, out
    code, out = gpl("anchors", "merge", "--run-dir", str(run), "--remove-shards")
    assert code == 0 and f"{one.num_rows} anchor sets from 2 shards" in out, out
    merged = pq.read_table(anchors_file).sort_by(keys)
    assert merged.drop_columns(["anchor_log_probs"]).equals(one.drop_columns(["anchor_log_probs"]))
    assert not (run / "anchors" / "shards").exists()
    code, out = gpl(*gen, "--shard", "2/2")
    assert code == 2 and "shard 2/2" in out and "Traceback" not in out, out


def test_environment_errors_are_one_line_saying_what_to_do(tmp_path: Path, sids_run: Path) -> None:
    """A config that is not YAML (or not a file), a checkpoint folder without a model, the
    feature registry not applied yet, a stage's input not written yet: one line, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    run = shutil.copytree(sids_run, tmp_path / "run")
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    cases = [
        (("data", "synth", "--run-dir", str(run), "--config", str(bad)), "not valid YAML"),
        (("data", "synth", "--run-dir", str(run), "--config", str(tmp_path)), "not a file"),
        (
            ("anchors", "train", "--run-dir", str(run), "--base-model", str(empty)),
            "not a usable Hugging Face checkpoint",
        ),
        (("train", "--run-dir", str(run)), "run `gpl features apply` first"),
        (
            ("sids", "train", "--run-dir", str(tmp_path / "fresh")),
            "run `gpl data synth` or `gpl data import` first",
        ),
    ]
    for args, says in cases:
        code, out = gpl(*args)
        assert code == 2 and says in out and "Traceback" not in out, (args, out)


def test_materialize_loads_a_log_from_the_past_and_flags_rewritten_tables(
    tmp_path: Path, sids_run: Path
) -> None:
    """The synthetic log is from the past: a first incremental load loads all of it (Feast's own
    first window, now - ttl, loaded none). Statistics rebuilt with other settings keep their
    timestamps: an incremental load says so, --full brings them online. Before `features apply`
    there is nothing to load at all (exit 2)."""
    from training.features.store import open_store

    run = shutil.copytree(sids_run, tmp_path / "run")
    code, out = gpl("features", "materialize", "--run-dir", str(run))
    assert code == 2 and "run `gpl features apply` first" in out, out
    for verb in ("build", "apply"):
        code, out = gpl("features", verb, "--run-dir", str(run))
        assert code == 0, out
    code, out = gpl("features", "materialize", "--run-dir", str(run))
    assert code == 0 and "loaded in full (new to this online store)" in out, out
    assert "item_popularity" in out and "warning" not in out, out
    items = pq.read_table(run / "features" / "item_popularity.parquet", columns=["item_id"])
    some = sorted(set(items.column("item_id").to_pylist()))[:5]

    def online_ctr() -> list[float]:
        got = open_store(run).get_online_features(
            features=["item_popularity:ctr_smoothed"], entity_rows=[{"item_id": i} for i in some]
        )
        return list(got.to_dict()["ctr_smoothed"])

    before = online_ctr()
    assert all(v is not None for v in before)
    config = tmp_path / "features.yaml"
    config.write_text("ctr_prior_impressions: 500\n")
    code, out = gpl("features", "build", "--run-dir", str(run), "--config", str(config))
    assert code == 0, out
    code, out = gpl("features", "materialize", "--run-dir", str(run))
    assert code == 0 and "warning: " in out and "materialize --full" in out, out
    assert "item_popularity" in out.split("warning: ")[1], out
    # An item whose rows left the table (a catalog clean-up) leaves the online store on --full.
    path = run / "features" / "item_popularity.parquet"
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.not_equal(table.column("item_id"), some[0])), path)
    code, out = gpl("features", "materialize", "--run-dir", str(run), "--full")
    assert code == 0 and "warning" not in out, out
    assert "removed entities no longer in their tables: 1 from item_popularity" in out, out
    after = online_ctr()
    assert after[0] is None and after[1:] != before[1:]


def test_co_occurrence_prior_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`prior: {weight: auto}` in the file: train chooses the weight on the held-out users and
    generate decodes with it; `--prior-weight` overrides the file; a bad value is one line."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING + "prior: {weight: auto}\n")
    train_out, gen_out = _train_and_generate(run, anchors)
    chosen = json.loads((run / "anchors" / "model" / "manifest.json").read_text())["metrics"][
        "prior_weight_chosen"
    ]
    assert chosen is not None and f"prior_weight_chosen: {chosen}" in train_out
    assert f"prior_weight: {chosen}" in gen_out
    code, out = gpl(
        "anchors", "generate", "--run-dir", str(run), "--config", str(anchors),
        "--prior-weight", "1.5",
    )  # fmt: skip
    assert code == 0, out
    assert (
        json.loads((run / "anchors" / "manifest.json").read_text())["metrics"]["prior_weight"]
        == 1.5
    )
    code, out = gpl(
        "anchors", "generate", "--run-dir", str(run), "--config", str(anchors),
        "--prior-weight", "lots",
    )  # fmt: skip
    assert code == 2 and "prior.weight" in out and "Traceback" not in out, out


def test_prior_fused_into_training_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`gpl anchors train --prior-train-weight W`: generation decodes with W unless told."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    train_out, gen_out = _train_and_generate(run, anchors, "--prior-train-weight", "0.5")
    assert "prior_weight_chosen: 0.5" in train_out
    assert "prior_weight: 0.5" in gen_out
    code, out = gpl(
        "anchors", "train", "--run-dir", str(run), "--config", str(anchors),
        "--prior-train-weight", "-1",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out, out


def test_content_prior_and_history_exclusion_from_the_command_line(
    tmp_path: Path, sids_run: Path
) -> None:
    """`--prior-content-weight` lands in the saved prior; `--exclude-history` in the anchors."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    _train_and_generate(run, anchors, "--prior-train-weight", "1", "--prior-content-weight", "0.5")
    info = json.loads((run / "anchors" / "model" / "cooccurrence_prior.json").read_text())
    assert info["content_weight"] == 0.5 and info["content_neighbors"] == 50
    code, out = gpl(
        "anchors", "generate", "--run-dir", str(run), "--config", str(anchors), "--exclude-history",
    )  # fmt: skip
    assert code == 0, out
    manifest = json.loads((run / "anchors" / "manifest.json").read_text())
    assert manifest["config"]["generation"]["exclude_history"] is True
    code, out = gpl(
        "anchors", "train", "--run-dir", str(run), "--config", str(anchors),
        "--prior-content-weight", "-1",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out, out


def test_collaborative_block_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`--collaborative-weight` / `--collaborative-until` merge with the config file's section."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    sids = tmp_path / "sids.yaml"
    sids.write_text(
        "method: rkmeans\ncodebook_size: 16\nshow_progress: false\ncollaborative: {dim: 8}\n"
    )
    interactions = pq.read_table(run / "data" / "interactions.parquet")
    times = sorted(interactions.column("event_timestamp").to_pylist())
    until = times[len(times) // 2]
    code, out = gpl(
        "sids", "train", "--run-dir", str(run), "--config", str(sids),
        "--collaborative-weight", "1.0",
        "--collaborative-until", until.replace(tzinfo=None).isoformat(),
    )  # fmt: skip
    assert code == 0, out
    assert "collaborative block: weight 1.0" in out
    manifest = json.loads((run / "sids" / "manifest.json").read_text())
    block = manifest["metrics"]["collaborative"]
    assert block["until"] == until.isoformat()
    assert block["interactions_before_until"] == sum(t < until for t in times)
    assert manifest["config"]["collaborative"]["dim"] == 8
    assert manifest["config"]["fusion"]["collaborative_dim"] == 8
    width = len(pq.read_table(run / "sids" / "item_semantics.parquet")["content_embedding"][0])
    assert width == manifest["config"]["fusion"]["text_dim"] + 8


def test_anchor_input_errors_are_one_line_not_a_traceback(tmp_path: Path, sids_run: Path) -> None:
    """Errors the stage finds in its inputs (here: histories too long for the model's positions)
    print as one line with exit code 2."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(
        "model:\n  compact: {hidden_size: 16, num_layers: 1, num_heads: 2, num_kv_heads: 1,"
        " intermediate_size: 32, max_position_embeddings: 16}\n" + TINY_TRAINING
    )
    code, out = gpl("anchors", "train", "--run-dir", str(run), "--config", str(anchors))
    assert code == 2, out
    # The project's own errors are written for the user: no class name in front.
    assert "error: sequences of up to" in out and "Traceback" not in out
    assert not (run / "anchors" / "model").exists()


def test_lora_anchor_model_from_the_command_line(tmp_path: Path, sids_run: Path) -> None:
    """`gpl anchors train --base-model DIR` tunes a local checkpoint; `generate` uses it.

    The file holds a text prefix, valid only with a checkpoint, which comes from the command line.
    """
    from training.anchors.base_checkpoint import main as make_base

    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(
        "model: {text_prefix: 'Items the user liked:', lora: {rank: 4}}\n" + TINY_TRAINING
    )
    base = tmp_path / "base"
    make_base([str(base)])
    _train_and_generate(run, anchors, "--base-model", str(base))
    info = json.loads((run / "anchors" / "model" / "anchor_model.json").read_text())
    assert info["kind"] == "lora" and info["base_model_path"] == str(base)
    assert (run / "anchors" / "model" / "adapter").is_dir()
    assert pq.read_table(run / "anchors" / "user_interest_anchors.parquet").num_rows > 0


@pytest.mark.slow
def test_demo_on_a_catalog_smaller_than_the_default_codebooks(tmp_path: Path) -> None:
    """200 items (the default codebooks have 256 codes): the demo shrinks them and runs."""
    code, out = gpl(
        "demo", "--run-dir", str(tmp_path / "run"), "--n-items", "200", "--n-users", "40"
    )  # fmt: skip
    assert code == 0, out
    assert "sids: 200 items, codebook sizes [32, 32, 32" in out
    code, out = gpl("demo", "--run-dir", str(tmp_path / "other"), "--n-items", "10")
    assert code == 2 and "--n-items" in out, out


@pytest.mark.slow
def test_demo_end_to_end_with_a_lora_anchor_model(tmp_path: Path) -> None:
    """The main job at a small size, its anchor stage tuning a local checkpoint with LoRA and its
    item space holding a collaborative block."""
    from training.anchors.base_checkpoint import main as make_base

    base, run = tmp_path / "base", tmp_path / "run"
    make_base([str(base)])
    code, out = gpl(
        "demo", "--run-dir", str(run), "--n-items", "300", "--n-users", "40", "--lm-epochs", "1",
        "--base-model", str(base), "--collaborative-weight", "1",
    )  # fmt: skip
    assert code == 0, out
    info = json.loads((run / "anchors" / "model" / "anchor_model.json").read_text())
    assert info["kind"] == "lora" and info["base_model_path"] == str(base)
    for stage in ("sids", "anchors", "pseudo_labels", "training_set", "preranker", "bundle"):
        assert (run / stage).is_dir(), stage
    assert pq.read_table(run / "pseudo_labels" / "pseudo_labels.parquet").num_rows > 0
    # Everything fitted before the report's cutoff saw only what was known before it: the anchor
    # LM its positives, the calibration its exposed rows and their clicks.
    times = pq.read_table(run / "funnel" / "requests.parquet", columns=["event_timestamp"])
    cutoff = time_quantile(times, 0.8)
    calibration = read_manifest(run / "pseudo_labels")["metrics"]["calibration"]
    assert calibration["until"] == cutoff.isoformat()
    interactions = pq.read_table(run / "data" / "interactions.parquet")
    before = pc.sum(pc.less(interactions["event_timestamp"], cutoff)).as_py()
    assert 0 < before < interactions.num_rows
    assert read_manifest(run / "anchors" / "model")["metrics"]["positives"] == before
    block = read_manifest(run / "sids")["metrics"]["collaborative"]
    assert block["until"] == cutoff.isoformat()
    assert block["interactions_before_until"] == before
    # ... so `gpl evaluate` found no upstream stage that saw its evaluation period.
    assert "past the evaluation cutoff" not in out and "at or after the evaluation" not in out
    latest = read_manifest(run / "anchors" / "model")["metrics"]["latest_positive"]
    assert datetime.fromisoformat(latest) < cutoff
    assert read_manifest(run / "pseudo_labels")["inputs"]["positives"] == (
        "data/interactions.parquet"
    )
    assert re.search(r"relevance AUC on them 0\.\d+", out)
    # The simulated clicks come days after their impressions: some before the training cutoff
    # are known only after it, and training saw them as the negatives they were then.
    assert re.search(r"^\d+ clicks of requests before .* became known only after it", out, re.M)
    # It ended by serving a request from the exported bundle, then printed the timings.
    assert "service stopped" in out and re.search(r"^total\s+\d+\.\d+$", out, re.M)


def test_stage_logs_reach_stderr_at_the_chosen_level(tmp_path: Path, sids_run: Path) -> None:
    """Per-epoch held-out metrics are logged at INFO: shown by default, hidden by warning."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    train = ("anchors", "train", "--run-dir", str(run), "--config", str(anchors))
    result = runner.invoke(app, list(train))
    assert result.exit_code == 0, result.output
    assert "training.anchors.train: epoch 1: train loss" in result.stderr
    assert "HR@10" in result.stderr and "epoch 1: train loss" not in result.stdout
    quiet = runner.invoke(app, ["--log-level", "warning", *train])
    assert quiet.exit_code == 0, quiet.output
    assert "epoch 1: train loss" not in quiet.output
    code, out = gpl("--log-level", "chatty", *train)
    assert code == 2 and "chatty" in out


def test_pseudo_labels_scored_by_the_anchor_lm_from_the_command_line(
    tmp_path: Path, sids_run: Path
) -> None:
    """`--relevance lm_likelihood` reads RUN_DIR/anchors/model; without it, one clear line."""
    run = shutil.copytree(sids_run, tmp_path / "run")
    code, out = gpl("pseudo-labels", "--run-dir", str(run), "--relevance", "lm_likelihood")
    assert code == 2 and "gpl anchors generate" in out, out  # no anchors yet
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(TINY_ANCHORS + TINY_TRAINING)
    # The likelihood recipe replaces the file's values for its keys; --epochs still wins.
    _train_and_generate(run, anchors, "--for-likelihood", "--epochs", "2")
    trained = json.loads((run / "anchors" / "model" / "manifest.json").read_text())["config"]
    assert trained["sequences"]["downsample_threshold"] is None
    assert trained["training"]["label_smoothing"] == 0.0
    assert trained["training"]["early_stopping_metric"] == "loss"
    assert trained["training"]["epochs"] == 2
    code, out = gpl("pseudo-labels", "--run-dir", str(run), "--relevance", "bogus")
    assert code == 2 and "--relevance" in out and "lm_likelihood" in out, out
    code, out = gpl("pseudo-labels", "--run-dir", str(run), "--relevance", "lm_likelihood")
    assert code == 0, out
    manifest = json.loads((run / "pseudo_labels" / "manifest.json").read_text())
    assert manifest["metrics"]["relevance"] == "lm_likelihood"
    assert manifest["inputs"]["anchor_model"] == "anchors/model"
    assert manifest["metrics"]["relevance_model_caveats"] == []
    # By default the LM's relevance adds the history density, its weight fitted and reported.
    assert manifest["metrics"]["history_density"]["fitted"], manifest["metrics"]
    assert "history density weight" in out and "fitted on the exposed clicks" in out, out
    code, out = gpl(
        "pseudo-labels", "--run-dir", str(run), "--relevance", "lm_likelihood",
        "--history-density-weight", "0",
    )  # fmt: skip
    assert code == 0 and "history density" not in out, out
    labels = pq.read_table(run / "pseudo_labels" / "pseudo_labels.parquet")
    ok = labels.filter(pc.equal(labels["status"], "ok"))
    assert ok.num_rows > 0 and pc.max(ok["relevance"]).as_py() <= 0  # a log-probability alone
    code, out = gpl("pseudo-labels", "--run-dir", str(run), "--history-density-weight", "lots")
    assert code == 2 and "history_density_weight" in out, out
