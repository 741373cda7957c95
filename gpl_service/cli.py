"""The ``gpl`` command line. Its verbs follow the pipeline, left to right.

    gpl data synth | data import movielens|amazon | data validate   (contract tables)
    gpl data simulate                                               (funnel -> requests, truth)
    gpl sids train | sids assign                                    (Semantic IDs)
    gpl anchors train | anchors generate | anchors merge            (interest anchors, LM)
    gpl pseudo-labels                                               (unexposed candidates)
    gpl features build | apply | materialize | training-set         (Feast)
    gpl train                                                       (light + expressive models)
    gpl evaluate                                                    (baselines vs GPL/HAP report)
    gpl export                                                      (ONNX bundle, parity-checked)
    gpl serve                                                       (FastAPI pre-ranking service)
    gpl demo                                                        (all of the above)
    gpl config STAGE                                                (settings, explained)

Every command works on a *run directory* (``--run-dir``, or ``GPL_RUN_DIR``; default
``runs/demo``) holding each stage's parquet outputs and manifest, so any stage can be re-run
alone. Bad input exits with code 2 and one line per problem.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError

# typer 0.29 vendors click; its context is the one a typer command runs in (typer is pinned, and
# tests/test_cli.py fails if these stop naming the options a user typed).
from typer._click.core import Context, ParameterSource
from typer._click.globals import get_current_context
from typer.core import TyperGroup, TyperOption

from training.data.contract import ContractError
from training.evaluation.bootstrap import DEFAULT_RESAMPLES

# "\b" alone on a line tells click not to re-wrap the next paragraph: the verb table.
_HELP = (__doc__ or "").replace("right.\n\n", "right.\n\n\b\n", 1)

#: The verbs in ``gpl --help``, in pipeline order (click would list them alphabetically).
_PIPELINE_ORDER: Final = (
    "data",
    "sids",
    "anchors",
    "pseudo-labels",
    "features",
    "train",
    "evaluate",
    "export",
    "serve",
    "demo",
    "config",
)

_PIPELINE_RANK: Final = {name: rank for rank, name in enumerate(_PIPELINE_ORDER)}


class _PipelineOrderGroup(TyperGroup):
    """Lists the top-level verbs in the order the pipeline runs them."""

    def list_commands(self, ctx: Context) -> list[str]:
        names = super().list_commands(ctx)
        last = len(_PIPELINE_RANK)
        return sorted(names, key=lambda name: (_PIPELINE_RANK.get(name, last), name))


app = typer.Typer(
    cls=_PipelineOrderGroup,
    help=_HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Bring data into the contract: import, synthesize, validate, simulate.",
    no_args_is_help=True,
)
features_app = typer.Typer(
    help="Feast: build feature tables, apply definitions, materialize, join.", no_args_is_help=True
)
sids_app = typer.Typer(
    help="Semantic IDs: frozen content encoder + RQ-VAE (or residual k-means).",
    no_args_is_help=True,
)
anchors_app = typer.Typer(
    help="Interest anchors: a causal LM over SID sequences, trie-constrained beam search.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(sids_app, name="sids")
app.add_typer(anchors_app, name="anchors")
app.add_typer(features_app, name="features")

RunDir = Annotated[
    Path,
    typer.Option(
        "--run-dir",
        envvar="GPL_RUN_DIR",
        help="Run directory holding every stage's outputs (env GPL_RUN_DIR).",
    ),
]
DEFAULT_RUN_DIR = Path("runs/demo")
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file with settings for this stage; `gpl config STAGE` prints every "
        "setting with its default and meaning.",
    ),
]

M = TypeVar("M", bound=BaseModel)

#: Every time option accepts these (a time without an offset is UTC): a date, a time to the
#: second with "T" or a space, and an ISO time with its offset.
TIME_FORMATS: Final = [
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%z",
]

#: The packages whose log records the command line shows (third-party loggers stay at WARNING).
_OWN_LOGGERS: Final = ("training", "gpl_service", "export", "feature_repo")


class LogLevel(enum.StrEnum):
    """How much the stages report besides their progress bars and summaries."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class _TqdmStderrHandler(logging.Handler):
    """Writes records to the *current* ``sys.stderr`` through ``tqdm.write``.

    ``tqdm.write`` keeps an open progress bar intact (the record goes above it). The stream is
    looked up per record, not bound once, so a handler installed by one command keeps working
    when a caller swaps ``sys.stderr`` (test runners, notebooks).
    """

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never break the command
            self.handleError(record)


def _configure_logging(level: LogLevel) -> None:
    """Show this project's log records (epoch summaries, chosen weights, skipped rows) on stderr.

    Without a handler Python prints only warnings, bare: per-epoch held-out HR@10 of
    ``gpl anchors train`` or the prior weight it chose would be invisible. One handler on the
    root logger, installed once per process; the project's loggers get ``level`` and records
    still propagate, so an application's own logging configuration keeps working.
    """
    root = logging.getLogger()
    if not any(isinstance(h, _TqdmStderrHandler) for h in root.handlers):
        handler = _TqdmStderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())


@app.callback()
def _root(
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            envvar="GPL_LOG_LEVEL",
            case_sensitive=False,
            help="What the stages log to stderr besides progress bars: 'info' adds per-epoch "
            "metrics and the choices a stage made (env GPL_LOG_LEVEL).",
        ),
    ] = LogLevel.info,
) -> None:
    _configure_logging(log_level)


class UsageError(Exception):
    """Bad input from the user: printed as one line per problem, exit code 2."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn expected input errors into clear messages and exit code 2 (never a traceback)."""
    try:
        yield
    except ContractError as exc:
        for line in exc.report_lines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        typed = _options_typed()
        for err in exc.errors():
            typer.echo(f"error: {_setting_name(err['loc'], typed)}: {err['msg']}", err=True)
        raise typer.Exit(2) from exc
    except (UsageError, FileNotFoundError, NotADirectoryError) as exc:
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from exc
    except OSError as exc:  # a run directory that cannot be written, a path that is a folder
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:
        hint = _environment_hint(exc)
        if hint is None and not isinstance(exc, _stage_errors()):
            raise
        # The project's own errors are written for the user; a dependency's keeps its class
        # name (``OutOfMemoryError: ...``, ``ConnectionError: ...``), which says what failed.
        own = type(exc).__module__.split(".")[0] in _OWN_LOGGERS
        label = "" if own else f"{type(exc).__name__}: "
        typer.echo(f"error: {label}{exc}{hint or ''}", err=True)
        raise typer.Exit(2) from exc


def _options_typed() -> dict[str, str]:
    """The current command's options the user gave (command line or environment): name -> flag."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return {}
    typed: dict[str, str] = {}
    for param in ctx.command.params:
        if not isinstance(param, TyperOption) or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            typed[param.name] = max(param.opts, key=len)
    return typed


def _setting_name(loc: tuple[int | str, ...], typed: dict[str, str]) -> str:
    """How an error names a setting: the option the user typed where it came from one.

    A user who typed ``--n-items 0`` should read ``--n-items``, not the setting key ``n_items``;
    a nested setting keeps its key too (``--batch-size (generation.batch_size)``), since a
    config file may hold it as well.
    """
    key = ".".join(str(part) for part in loc) or "config"
    last = loc[-1] if loc else None
    if not isinstance(last, str) or last not in typed:
        return key
    return typed[last] if len(loc) == 1 else f"{typed[last]} ({key})"


def _environment_hint(exc: Exception) -> str | None:
    """What to do about errors of the feature store's environment (None: not one of them)."""
    from feast.errors import FeatureServiceNotFoundException, FeatureViewNotFoundException

    if isinstance(exc, FeatureServiceNotFoundException | FeatureViewNotFoundException):
        return "; run `gpl features apply` first (it registers the views and services)"
    module = type(exc).__module__
    if module.startswith("redis") and "Connection" in type(exc).__name__:
        return "; is the Redis server of GPL_REDIS_URL running? (`make redis` starts one)"
    return None


def _stage_errors() -> tuple[type[BaseException], ...]:
    """Errors the stages raise on bad input or resources: one line, exit code 2."""
    import torch

    from export.bundle import BundleError, ExportError
    from export.parity import ExportParityError
    from gpl_service.app import ServiceStartError
    from training.anchors.errors import AnchorInputError
    from training.data.errors import DatasetFormatError
    from training.evaluation.ranking import EvaluationError
    from training.features.training_set import RowsLostError
    from training.preranker.data import PrerankerDataError
    from training.pseudo_labels.calibration import CalibrationError
    from training.pseudo_labels.job import PseudoLabelInputError
    from training.sids.encoder import EncoderError
    from training.sids.job import SidInputError
    from training.sids.tokenizer import CodebookFormatError

    return (
        DatasetFormatError,
        SidInputError,
        ExportError,
        ExportParityError,
        BundleError,
        ServiceStartError,
        EncoderError,
        CodebookFormatError,
        AnchorInputError,  # incl. SidVocabularyError and ItemSemanticsError
        PseudoLabelInputError,
        CalibrationError,
        PrerankerDataError,
        EvaluationError,
        RowsLostError,
        torch.OutOfMemoryError,
    )


def _raw_config(path: Path | None) -> dict[str, Any]:
    """A config file's settings, not yet validated (empty without a file)."""
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist or is not a file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"config file {path} is not valid YAML: {' '.join(str(exc).split())}"
        ) from exc
    if not isinstance(loaded, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return loaded


def _load_config(model: type[M], path: Path | None, **overrides: Any) -> M:
    raw = _raw_config(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return model.model_validate(raw)


def _set(raw: dict[str, Any], section: str, key: str, value: Any) -> None:
    """Override ``raw[section][key]`` with a command-line value (when given)."""
    if value is not None:
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise UsageError(f"config: {section} must be a mapping of settings")
        node[key] = value


def _as_utc(moment: datetime) -> datetime:
    """A command-line time: one given without an offset is read as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _say(message: str) -> None:
    typer.echo(message)


@contextmanager
def _timed(label: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    began = time.perf_counter()
    _say(f"[{label}] ...")
    yield
    seconds = time.perf_counter() - began
    if timings is not None:
        timings[label] = seconds
    _say(f"[{label}] done in {seconds:.2f}s")


# ---------------------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 7).")] = None,
    n_items: Annotated[int | None, typer.Option(help="Catalog size (default 2,000).")] = None,
    n_users: Annotated[int | None, typer.Option(help="Number of users (default 500).")] = None,
) -> None:
    """Generate a synthetic catalog and interaction log.

    Topic vocabularies, Zipf popularity, users with several drifting interests.

    Writes RUN_DIR/data/{items,interactions}.parquet and a manifest.
    """
    from training.data.synthetic import SynthConfig, generate_synthetic

    with _user_errors():
        cfg = _load_config(SynthConfig, config, seed=seed, n_items=n_items, n_users=n_users)
        dataset = generate_synthetic(cfg)
        dataset.write(run_dir / "data", cfg.model_dump(mode="json"))
        _say(
            f"synthetic: {dataset.items.num_rows} items, {dataset.interactions.num_rows} "
            f"interactions -> {run_dir / 'data'}"
        )


import_app = typer.Typer(
    help="Import a public dataset into the data contract.", no_args_is_help=True
)
data_app.add_typer(import_app, name="import")


@import_app.command("movielens")
def import_movielens(
    path: Annotated[
        Path, typer.Argument(help="MovieLens-100k directory (u.data, u.item, u.genre).")
    ],
    run_dir: RunDir = DEFAULT_RUN_DIR,
    min_rating: Annotated[float | None, typer.Option(help="Keep only ratings >= this.")] = None,
) -> None:
    """Import MovieLens-100k: every rating is an engagement; text = title, year and genres."""
    from training.data.movielens import load_movielens_100k

    with _user_errors():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory")
        dataset = load_movielens_100k(path, min_rating=min_rating)
        if dataset.interactions.num_rows == 0:
            raise UsageError(
                f"no rating is >= --min-rating {min_rating} (MovieLens ratings are 1-5): nothing "
                "to import"
            )
        dataset.write(run_dir / "data", {"source": str(path), "min_rating": min_rating})
        _say(
            f"ml-100k: {dataset.items.num_rows} items, {dataset.interactions.num_rows} "
            f"interactions -> {run_dir / 'data'}"
        )


@import_app.command("amazon")
def import_amazon(
    path: Annotated[
        Path, typer.Argument(help="Directory with <Name>.text and <Name>.{train,valid,test}.inter.")
    ],
    run_dir: RunDir = DEFAULT_RUN_DIR,
    name: Annotated[
        str | None, typer.Option(help="Dataset prefix, e.g. Scientific; detected when omitted.")
    ] = None,
) -> None:
    """Import an Amazon reviews dataset in the UniSRec format (timestamps are synthesized)."""
    from training.data.amazon import load_unisrec

    with _user_errors():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory")
        dataset = load_unisrec(path, name=name)
        dataset.write(run_dir / "data", {"source": str(path), "name": name})
        _say(
            f"{dataset.name}: {dataset.items.num_rows} items, {dataset.interactions.num_rows} "
            f"interactions -> {run_dir / 'data'}"
        )


@data_app.command("validate")
def data_validate(
    table: Annotated[
        str, typer.Argument(help="Contract table: items, interactions, requests or truth.")
    ],
    path: Annotated[Path, typer.Argument(help="Parquet file to check.")],
) -> None:
    """Check a parquet file against the data contract; report every problem (exit 2 if any)."""
    from training.data.contract import TABLES
    from training.io import read_table

    with _user_errors():
        if table not in TABLES:
            raise UsageError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
        result = read_table(path, table)
        _say(f"{path}: valid {table} table, {result.num_rows} rows")


@data_app.command("simulate")
def data_simulate(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    requests_per_user: Annotated[
        int | None, typer.Option(help="Requests simulated per user (default 4).")
    ] = None,
) -> None:
    """Run the funnel simulator on RUN_DIR/data: writes RUN_DIR/funnel/{requests,truth}.parquet.

    Retrieval (popular + co-occurrence + random) -> popularity-biased pre-rank -> rank -> exposure,
    clicks from the users' real next engagements. See docs/simulator.md.
    """
    from training.data.simulator import SimulatorConfig, simulate_funnel
    from training.io import read_table

    with _user_errors():
        cfg = _load_config(SimulatorConfig, config, seed=seed, requests_per_user=requests_per_user)
        items = read_table(run_dir / "data" / "items.parquet", "items")
        interactions = read_table(run_dir / "data" / "interactions.parquet", "interactions")
        if interactions.num_rows == 0:
            raise UsageError(
                f"{run_dir / 'data' / 'interactions.parquet'} holds no interactions: there is "
                "nothing to simulate requests from"
            )
        result = simulate_funnel(items, interactions, cfg)
        if result.requests.num_rows == 0:
            raise UsageError(
                "the simulator made no request from these interactions (users need a history "
                "before their first request; see `gpl config simulate`)"
            )
        result.write(
            run_dir / "funnel",
            cfg.model_dump(mode="json"),
            inputs={
                "items": "data/items.parquet",
                "interactions": "data/interactions.parquet",
            },
        )
        _say(
            f"funnel: {result.requests.num_rows} request rows, {result.truth.num_rows} truth rows "
            f"-> {run_dir / 'funnel'}"
        )
        for key, value in result.stats.items():
            if isinstance(value, int | float | str):
                _say(f"  {key}: {value}")


# ------------------------------------------------------------------------------------ features


@features_app.command("build")
def features_build(run_dir: RunDir = DEFAULT_RUN_DIR, config: ConfigFile = None) -> None:
    """Compute point-in-time item and user statistics from RUN_DIR's catalog and request log.

    user_history (each user's latest positives) comes from RUN_DIR/data/interactions.parquet
    when it exists, else from the request log's clicks.
    """
    from training.features.stats import StatsConfig, compute_feature_tables
    from training.io import read_table

    with _user_errors():
        cfg = _load_config(StatsConfig, config)
        items = read_table(run_dir / "data" / "items.parquet", "items")
        requests = read_table(run_dir / "funnel" / "requests.parquet", "requests")
        log = run_dir / "data" / "interactions.parquet"
        interactions = read_table(log, "interactions") if log.exists() else None
        tables = compute_feature_tables(items, requests, cfg, interactions)
        tables.write(run_dir, cfg)
        _say(
            f"features: item_content {tables.item_content.num_rows} rows, item_popularity "
            f"{tables.item_popularity.num_rows} rows, "
            f"user_activity {tables.user_activity.num_rows} rows, "
            f"user_history {tables.user_history.num_rows} rows "
            f"(from {tables.info['user_history_source']})"
        )


@features_app.command("apply")
def features_apply(run_dir: RunDir = DEFAULT_RUN_DIR) -> None:
    """Register the feature repo (entities, sources, views, services) in RUN_DIR's registry.

    Writes RUN_DIR/feature_store.yaml: SQLite online store by default, Redis when GPL_REDIS_URL is
    set. Browse the result with `feast -c RUN_DIR ui`.
    """
    from training.features.store import apply_definitions, open_store

    with _user_errors():
        store = open_store(run_dir)
        names = apply_definitions(store)
        _say(f"applied {len(names)} objects to project {store.project!r}: {', '.join(names)}")


@features_app.command("materialize")
def features_materialize(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    end: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS, help="Latest feature timestamp to load (UTC); default: now."
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            help="Reload every view from the beginning, replacing what is online. Needed after "
            "a stage re-ran over past data (a new `gpl sids train`, rebuilt statistics): their "
            "rows keep their timestamps, which an incremental load never revisits and Redis "
            "keeps unless a row is newer. Entities gone from a table are removed from its view "
            "first; every other entity stays readable (old value or new) throughout."
        ),
    ] = False,
) -> None:
    """Load the latest feature values into the online store (SQLite, or Redis by GPL_REDIS_URL).

    Needs `gpl features apply` first. Incremental by default: each view from its last load
    into this online store; a view the store never had (a new view, or the run just switched
    between SQLite and Redis) loads from the beginning. Warns when a view's table was rewritten
    without newer rows (use --full).
    """
    from training.features.store import materialize, open_store

    with _user_errors():
        store = open_store(run_dir)
        end_utc = _as_utc(end) if end else datetime.now(UTC)
        report = materialize(store, end=end_utc, replace=full)
        if not report.views and not report.skipped and not report.up_to_date:
            raise UsageError(
                f"{run_dir}: the registry has no online feature views; run `gpl features apply` "
                "first"
            )
        _say(
            f"materialized {', '.join(report.views) or 'nothing'} up to "
            f"{report.end:%Y-%m-%d %H:%M} in {report.seconds:.2f}s"
        )
        if report.first_loads:
            _say(f"loaded in full (new to this online store): {', '.join(report.first_loads)}")
        if any(report.removed.values()):
            gone = ", ".join(f"{n} from {v}" for v, n in report.removed.items() if n)
            _say(f"removed entities no longer in their tables: {gone}")
        if report.up_to_date:
            _say(
                f"already loaded up to {report.end:%Y-%m-%d %H:%M} or later: "
                f"{', '.join(report.up_to_date)}"
            )
        if report.skipped:
            _say(f"skipped (their stage has not run yet): {', '.join(report.skipped)}")
        if report.rewritten:
            typer.echo(
                f"warning: {', '.join(report.rewritten)}: the table was rewritten since the last "
                "load but has no newer rows (a stage re-run over past data?); an incremental "
                "load does not bring those online: run `gpl features materialize --full`",
                err=True,
            )


@features_app.command("training-set")
def features_training_set(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    service: Annotated[
        str,
        typer.Option(
            help="FeatureService to join: preranker (the features) or training_labels (the "
            "pseudo-labels)."
        ),
    ] = "preranker",
) -> None:
    """Point-in-time join the request log with a FeatureService.

    Writes RUN_DIR/training_set/training_set.parquet (preranker) or
    RUN_DIR/training_set/SERVICE/training_set.parquet (any other service), with a manifest.
    """
    from training.features.store import open_store
    from training.features.training_set import build_training_set
    from training.io import read_table

    with _user_errors():
        store = open_store(run_dir)
        registered = sorted(s.name for s in store.list_feature_services())
        if registered and service not in registered:
            raise UsageError(
                f"no feature service {service!r}; the registry has: {', '.join(registered)}"
            )
        requests = read_table(run_dir / "funnel" / "requests.parquet", "requests")
        ts = build_training_set(store, requests, service)
        path = ts.write(run_dir)
        _say(
            f"training set: {requests.num_rows} rows in, {ts.table.num_rows} rows out, "
            f"{len(ts.feature_columns)} features, coverage {ts.coverage} "
            f"-> {path} ({ts.seconds:.2f}s)"
        )


# ---------------------------------------------------------------------------------------- sids


def _print_metrics(prefix: str, metrics: dict[str, Any], keys: list[str]) -> None:
    for key in keys:
        if key in metrics:
            _say(f"  {prefix}{key}: {metrics[key]}")


@sids_app.command("train")
def sids_train(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    method: Annotated[
        str | None,
        typer.Option(help="rqvae (trained quantizer; default) or rkmeans (no training)."),
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option(help="Local encoder directory; default: bundled all-MiniLM-L6-v2."),
    ] = None,
    collaborative_weight: Annotated[
        float | None,
        typer.Option(
            help="Fuse a collaborative block (co-engagement in RUN_DIR's interactions) into the "
            "item space with this weight; 0 (default): content only."
        ),
    ] = None,
    collaborative_until: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Build the collaborative block from interactions before this time (UTC) only. "
            "Set it to the start of any period you will evaluate on.",
        ),
    ] = None,
) -> None:
    """Encode RUN_DIR's catalog and fit the quantizer: every item gets a unique SID.

    Writes RUN_DIR/sids/{item_semantics.parquet, codebooks.safetensors, manifest.json}; the
    embedding cache makes a re-run encode only new or changed texts. With
    --collaborative-weight above 0, the item space also places items by what users engage with
    together (RUN_DIR/data/interactions.parquet). See docs/semantic_ids.md.
    """
    from training.io import read_table
    from training.sids.config import SidConfig
    from training.sids.job import SidInputError, train_sids

    with _user_errors():
        raw = _raw_config(config)
        if method is not None:
            raw["method"] = method
        _set(raw, "encoder", "model_path", encoder)
        _set(raw, "collaborative", "weight", collaborative_weight)
        _set(raw, "collaborative", "until", collaborative_until and _as_utc(collaborative_until))
        cfg = SidConfig.model_validate(raw)
        items = read_table(run_dir / "data" / "items.parquet", "items")
        interactions = (
            read_table(run_dir / "data" / "interactions.parquet", "interactions")
            if cfg.collaborative.weight > 0
            else None
        )
        try:
            result = train_sids(items, cfg, run_dir / "sids", interactions)
        except SidInputError as exc:
            raise UsageError(*exc.problems) from exc
        _say(f"sids: {result.table.num_rows} items, codebook sizes {result.codebook_sizes}")
        if "collaborative" in result.metrics:
            block = result.metrics["collaborative"]
            _say(
                f"  collaborative block: weight {cfg.collaborative.weight}, "
                f"{block['interactions_before_until']} interactions, "
                f"{block['items_without_vector']} items without a vector"
            )
        _print_metrics(
            "",
            result.metrics,
            [
                "shared_prefix_rate_nearest",
                "collision_rate",
                "utilization",
                "recon_cosine",
                "seconds",
            ],
        )


@sids_app.command("assign")
def sids_assign(run_dir: RunDir = DEFAULT_RUN_DIR) -> None:
    """Give SIDs to new catalog items with the frozen codebooks; existing items keep theirs."""
    from training.io import read_table
    from training.sids.job import SidInputError, assign_sids

    with _user_errors():
        items = read_table(run_dir / "data" / "items.parquet", "items")
        try:
            result = assign_sids(items, run_dir / "sids")
        except SidInputError as exc:
            raise UsageError(*exc.problems) from exc
        _say(f"sids: {result.table.num_rows} items now, codebook sizes {result.codebook_sizes}")
        _print_metrics("", result.metrics, ["new_items", "changed_text", "seconds"])


# ------------------------------------------------------------------------------------- anchors


def _positives(run_dir: Path, until: datetime | None) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    from training.io import read_table

    table = read_table(run_dir / "data" / "interactions.parquet", "interactions")
    if until is not None:
        bound = pa.scalar(_as_utc(until))
        table = table.filter(pc.less(table.column("event_timestamp"), bound))
    return table


@anchors_app.command("train")
def anchors_train(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Local checkpoint (e.g. Qwen2.5-0.5B) to tune with LoRA; default: compact model."
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Train only on positives before this time (UTC). Set it to the start of any "
            "period you will evaluate on, or the model will have seen that period's future.",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Most training epochs (default 20; early stopping may end sooner)."),
    ] = None,
    ensemble_size: Annotated[
        int | None,
        typer.Option(
            help="Train this many models (seeds seed, seed+1, ...) that generation decodes "
            "together (default 1); K times the time, +3-8% HR@10 with 3-4 on Amazon Scientific."
        ),
    ] = None,
    prior_train_weight: Annotated[
        float | None,
        typer.Option(
            help="Fuse the item co-occurrence prior into the training loss with this weight "
            "(prior.train_weight; 0, the default: off). The LM then learns what co-occurrence "
            "does not say, and generation decodes with the same weight. On Amazon Scientific "
            "such anchors match co-occurrence at next-item hits; off by default, like the "
            "prior, as it carries the log's exposure bias (docs/anchors.md).",
            min=0.0,
        ),
    ] = None,
    prior_content_weight: Annotated[
        float | None,
        typer.Option(
            help="Multiply the co-occurrence prior by the history's content kernel density to "
            "this power (prior.content_weight; 0, the default: off), fixed in the saved prior. "
            "With --prior-train-weight 1 and generation.exclude_history, on Amazon Scientific "
            "(docs/anchors.md, 'The content factor').",
            min=0.0,
        ),
    ] = None,
    for_likelihood: Annotated[
        bool,
        typer.Option(
            "--for-likelihood",
            help="Train an LM whose probabilities `gpl pseudo-labels --relevance lm_likelihood` "
            "reads: no popular-item downsampling, no label smoothing, up to 60 epochs stopped "
            "on the held-out loss, learning rate 5e-3 (replacing the file's values for these "
            "keys; training/anchors/recipes.py). The benchmark's synthetic catalog: relevance "
            "AUC 0.731 -> 0.823 (docs/pseudo_labels.md).",
        ),
    ] = False,
) -> None:
    """Train the anchor LM on users' positive SID sequences: RUN_DIR/anchors/model/.

    Reads RUN_DIR/sids/item_semantics.parquet (`gpl sids train`) and the positives of
    RUN_DIR/data/interactions.parquet (before --until). With training.ensemble_size K > 1 (or
    --ensemble-size), members 2..K go to RUN_DIR/anchors/model/members/ and `gpl anchors
    generate` decodes all of them together.
    """
    from training.anchors.catalog import read_codebook_sizes
    from training.anchors.job import AnchorConfig, train_anchor_model
    from training.anchors.recipes import with_likelihood_recipe
    from training.io import read_table

    with _user_errors():
        # Command-line values join the file's before validation: a file may rely on them (a
        # text_prefix with the checkpoint given as --base-model).
        raw = _raw_config(config)
        if for_likelihood:
            raw = with_likelihood_recipe(raw)
        _set(raw, "model", "base_model_path", base_model)
        _set(raw, "training", "epochs", epochs)
        _set(raw, "training", "ensemble_size", ensemble_size)
        _set(raw, "prior", "train_weight", prior_train_weight)
        _set(raw, "prior", "content_weight", prior_content_weight)
        cfg = AnchorConfig.model_validate(raw)
        item_semantics = read_table(run_dir / "sids" / "item_semantics.parquet")
        sizes = read_codebook_sizes(run_dir / "sids", item_semantics)
        result = train_anchor_model(
            item_semantics, _positives(run_dir, until), sizes, cfg, run_dir / "anchors" / "model"
        )
        _say(f"anchor model -> {result.model_dir}")
        keys = ["eval_hr@10", "eval_ndcg@10", "best_epoch", "seconds"]
        if cfg.training.ensemble_size > 1:
            keys[2:2] = ["ensemble_eval_hr@10", "ensemble_eval_ndcg@10"]
        if result.metrics.get("prior_weight_chosen") is not None:  # auto, or train_weight
            keys.insert(-1, "prior_weight_chosen")
        _print_metrics("", result.metrics, keys)


@anchors_app.command("generate")
def anchors_generate(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    implementation: Annotated[
        str | None,
        typer.Option(help="fast (batched, KV-cache reuse; default) or reference (HF generate)."),
    ] = None,
    prior_weight: Annotated[
        str | None,
        typer.Option(
            help="Weight of the item co-occurrence prior fused into the beam search. Unset: the "
            "LM alone, or the training weight for a model trained with the prior fused "
            "(--prior-train-weight); 'auto': the weight chosen on the held-out users at "
            "training (see prior_tuning in the model's manifest); or a number."
        ),
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="Decode on several devices at once, one worker process each "
            "(generation.devices): comma-separated, e.g. cuda:0,cuda:1, or 'all' for every "
            "visible GPU. The anchors are those of one device."
        ),
    ] = None,
    incremental: Annotated[
        bool | None,
        typer.Option(
            "--incremental/--full",
            help="Keep the earlier output's sets whose user, cutoff and history are requested "
            "again, when the model, catalog and settings are unchanged, and decode only the rest "
            "(generation.incremental); --full (the default) decodes every set.",
        ),
    ] = None,
    exclude_history: Annotated[
        bool | None,
        typer.Option(
            "--exclude-history/--include-history",
            help="Never make an item of the user's own history one of its anchors "
            "(generation.exclude_history; default: included, as the pseudo-label figures were "
            "measured).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="K/N: decode only shard K (from 0) of N, the users whose id hashes to K, into "
            "RUN_DIR/anchors/shards/; run every K (on as many hosts as you like, with the same "
            "inputs and model), then `gpl anchors merge`. An incremental shard reuses the "
            "merged file of an earlier run.",
        ),
    ] = None,
) -> None:
    """Generate interest anchors for every user and request of RUN_DIR's request log.

    Reads the model of `gpl anchors train`, RUN_DIR/sids/item_semantics.parquet,
    RUN_DIR/funnel/requests.parquet and the positives of RUN_DIR/data/interactions.parquet.
    One anchor set per (user, request time) whose history changed, from positives strictly
    before it (generation.cutoffs: request; 'day' makes one per request day instead):
    RUN_DIR/anchors/user_interest_anchors.parquet. With --prior-weight (prior.weight) the beam
    search fuses the LM with the co-occurrence prior saved beside the model (docs/anchors.md).
    Several GPUs of one host: --devices; several hosts: --shard K/N on each, then merge.
    """
    from training.anchors.job import AnchorConfig, generate_anchors
    from training.anchors.sequences import cutoffs_of
    from training.anchors.shards import Shard
    from training.io import read_table

    with _user_errors():
        part = None if shard is None else Shard.parse(shard)
        raw = _raw_config(config)
        # Generation loads the trained model directory, which holds its own model settings: the
        # file's `model` section (shared with `train`, perhaps with --base-model given there) is
        # not read, so it is not validated either.
        raw.pop("model", None)
        _set(raw, "generation", "implementation", implementation)
        _set(raw, "prior", "weight", prior_weight)
        _set(raw, "generation", "incremental", incremental)
        _set(raw, "generation", "exclude_history", exclude_history)
        if devices is not None:
            names = [d.strip() for d in devices.split(",") if d.strip()]
            _set(raw, "generation", "devices", "all" if names == ["all"] else names)
        cfg = AnchorConfig.model_validate(raw)
        item_semantics = read_table(run_dir / "sids" / "item_semantics.parquet")
        requests = read_table(run_dir / "funnel" / "requests.parquet", "requests")
        model_dir = run_dir / "anchors" / "model"
        if not model_dir.exists():
            raise FileNotFoundError(f"{model_dir}: run `gpl anchors train` first")
        result = generate_anchors(
            item_semantics,
            _positives(run_dir, None),
            cutoffs_of(requests, cfg.generation.cutoffs),
            model_dir,
            cfg,
            run_dir / "anchors",
            users=sorted(set(requests.column("user_id").to_pylist())),
            shard=part,
        )
        _say(f"anchors: {result.metrics['anchor_sets']} anchor sets -> {result.path}")
        if part is not None:
            _say(
                f"  shard {part.index}/{part.count} done; once every shard is, run "
                f"`gpl anchors merge --run-dir {run_dir}`"
            )
        _print_metrics(
            "",
            result.metrics,
            [
                "users",
                "skipped_empty_history",
                "sets_reused",
                "sets_decoded",
                "prior_weight",
                "users_per_second",
                "seconds",
            ],
        )


@anchors_app.command("merge")
def anchors_merge(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    shards: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="How many shards to merge (the N of --shard K/N); needed only when "
            "RUN_DIR/anchors/shards/ holds runs of several counts.",
        ),
    ] = None,
    remove_shards: Annotated[
        bool,
        typer.Option(
            "--remove-shards/--keep-shards",
            help="Delete the shard folders once the merged file and manifest are written.",
        ),
    ] = False,
) -> None:
    """Merge the shards of `gpl anchors generate --shard K/N` into the stage's one file.

    Checks that all N shards finished, decoded with the same model, catalog and settings from
    the same inputs, and that every row is in its user's shard; then streams their rows into
    RUN_DIR/anchors/user_interest_anchors.parquet with a manifest of the summed counts (what the
    Feast views, `gpl pseudo-labels` and the next incremental run read).
    """
    from training.anchors.shards import merge_anchor_shards

    with _user_errors():
        result = merge_anchor_shards(run_dir / "anchors", count=shards, remove=remove_shards)
        _say(
            f"anchors: {result.metrics['anchor_sets']} anchor sets from "
            f"{result.metrics['shards']} shards -> {result.path}"
        )
        _print_metrics(
            "",
            result.metrics,
            ["users", "skipped_empty_history", "sets_reused", "sets_decoded", "seconds"],
        )


# ------------------------------------------------------------------------------- pseudo-labels


@app.command("pseudo-labels")
def pseudo_labels(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    include_global_negatives: Annotated[
        bool | None,
        typer.Option(
            "--include-global-negatives/--no-global-negatives",
            help="Also label global random negatives (default: no).",
        ),
    ] = None,
    calibrate_until: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Fit the relevance -> click calibration only on exposed rows before this time "
            "(UTC), with the clicks known then. Set it to the training cutoff of any period you "
            "will evaluate on, or that period's clicks will shape the training labels.",
        ),
    ] = None,
    relevance: Annotated[
        str | None,
        typer.Option(
            help="How candidates are scored: 'anchor_cosine' (GPL's max cosine to the anchors; "
            "the default) or 'lm_likelihood' (the anchor LM's own log-probability of the "
            "candidate given the user's history; reads RUN_DIR/anchors/model, best trained "
            "with `gpl anchors train --for-likelihood`).",
        ),
    ] = None,
    history_density_weight: Annotated[
        str | None,
        typer.Option(
            help="Weight of the user's history density (a kernel density of their positives at "
            "the candidate, in the content space) added to the relevance: a number, or "
            "'fitted' on the exposed clicks. Default: 'fitted' with --relevance lm_likelihood, "
            "0 (off) with anchor_cosine.",
        ),
    ] = None,
) -> None:
    """Pseudo-label unexposed candidates from the users' interest anchors.

    Reads RUN_DIR/funnel/requests.parquet (streamed), RUN_DIR/sids/item_semantics.parquet,
    RUN_DIR/anchors/user_interest_anchors.parquet and RUN_DIR/data/interactions.parquet (and
    RUN_DIR/anchors/model with --relevance lm_likelihood); writes RUN_DIR/pseudo_labels/.
    relevance = max cosine to the anchors (or the LM's log-probability of the candidate plus
    the weighted history density);
    confidence = weighted geometric mean of dispersion, history consistency and LM confidence;
    pseudo_label = Platt-calibrated relevance. See docs/pseudo_labels.md.
    """
    from training.io import read_manifest, read_table
    from training.pseudo_labels.calibration import CalibrationError
    from training.pseudo_labels.job import (
        PSEUDO_LABELS_DIR,
        PseudoLabelConfig,
        PseudoLabelInputError,
        generate_pseudo_labels,
    )

    with _user_errors():
        cfg = _load_config(
            PseudoLabelConfig,
            config,
            include_global_negatives=include_global_negatives,
            calibrate_until=_as_utc(calibrate_until) if calibrate_until else None,
            relevance=relevance,
            history_density_weight=history_density_weight,
        )
        requests_path = run_dir / "funnel" / "requests.parquet"
        if not requests_path.exists():
            raise FileNotFoundError(f"{requests_path}: run `gpl data simulate` first")
        item_semantics = read_table(run_dir / "sids" / "item_semantics.parquet")
        anchors = run_dir / "anchors" / "user_interest_anchors.parquet"
        if not anchors.exists():
            raise FileNotFoundError(f"{anchors}: run `gpl anchors generate` first")
        positives = read_table(run_dir / "data" / "interactions.parquet", "interactions")
        lm = None
        if cfg.relevance == "lm_likelihood":
            from training.anchors.generate import EnsembleCombine
            from training.pseudo_labels.lm_relevance import LmRelevance

            model_dir = run_dir / "anchors" / "model"
            if not model_dir.exists():
                raise FileNotFoundError(f"{model_dir}: run `gpl anchors train` first")
            # An ensemble's members are combined by the rule its anchors were generated with.
            generation = read_manifest(run_dir / "anchors").get("config", {}).get("generation")
            combine: EnsembleCombine = "arithmetic"
            if (generation or {}).get("ensemble_combine") == "geometric":
                combine = "geometric"
            lm = LmRelevance.load(model_dir, item_semantics, combine=combine)
        try:
            result = generate_pseudo_labels(
                requests_path,
                item_semantics,
                anchors,
                positives,
                cfg,
                run_dir / PSEUDO_LABELS_DIR,
                sources={
                    "item_semantics": "sids/item_semantics.parquet",
                    "positives": "data/interactions.parquet",
                    **({"anchor_model": "anchors/model"} if lm is not None else {}),
                },
                lm=lm,
            )
        except (CalibrationError, PseudoLabelInputError) as exc:
            raise UsageError(str(exc)) from exc
        m = result.metrics
        _say(
            f"pseudo-labels: {m['unexposed_rows']} unexposed rows, {m['ok_rows']} labelled, "
            f"{m['no_anchors_rows']} without anchors ({m['users_without_anchors']} users), "
            f"{m['no_item_embedding_rows']} without item embedding -> {result.path} "
            f"({m['seconds']:.2f}s)"
        )
        calibration = m["calibration"]
        if calibration["method"] == "platt":
            _say(
                f"  calibrated on {calibration['exposed_rows']} exposed rows "
                f"({calibration['clicks']} clicks); relevance AUC on them "
                f"{calibration['relevance_auc']} (compare settings by it)"
            )
        density = m["history_density"]
        if density is not None:
            _say(
                f"  history density weight {density['weight']:.3f} "
                f"({'fitted on the exposed clicks' if density['fitted'] else 'given'}); their "
                f"AUC: relevance alone {density['base_relevance_auc']}, density alone "
                f"{density['density_auc']}"
            )


# ---------------------------------------------------------------------------------------- demo


# ------------------------------------------------------------------------------- pre-ranker

SplitQuantile = Annotated[
    float,
    typer.Option(
        min=0.05,
        max=0.95,
        help="The cutoff, unless given as a time (`train --until`, `evaluate --since`): this "
        "quantile of request times.",
    ),
]


def _train_eval_split(run_dir: Path, cutoff: datetime | None, quantile: float) -> Any:
    from training.io import read_table
    from training.preranker.job import split_at, time_quantile

    requests = read_table(run_dir / "funnel" / "requests.parquet", "requests")
    cutoff = time_quantile(requests, quantile) if cutoff is None else _as_utc(cutoff)
    split = split_at(requests, cutoff)
    if split.before.num_rows == 0:
        raise UsageError(f"no request before {cutoff}: choose a later cutoff")
    if split.clicks_known_later:
        _say(
            f"{split.clicks_known_later} clicks of requests before {cutoff} became known only "
            "after it (label_timestamp): negatives for training, as the log stood then"
        )
    return cutoff, split.before, split.after


@app.command("train")
def train(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="exposed | unexposed_negative | distill | gpl | hap | gpl_hap (default)."
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Train on requests before this time (UTC); evaluate from it on.",
        ),
    ] = None,
    split_quantile: SplitQuantile = 0.8,
) -> None:
    """Train the light and expressive pre-rankers: RUN_DIR/preranker/.

    The request log before the cutoff is the entity dataframe of a point-in-time join through
    the `preranker` (features) and `training_labels` (pseudo-labels) FeatureServices, so it
    needs `gpl features build` and `gpl features apply` (and the pseudo-labels) first; the truth
    table is never read.
    """
    from training.features.store import open_store
    from training.io import read_table
    from training.preranker.config import PrerankerConfig
    from training.preranker.job import (
        FEATURE_SERVICE,
        PRERANKER_DIR,
        PSEUDO_OBJECTIVES,
        fit,
        join_features,
        prepare,
        save_preranker,
    )

    with _user_errors():
        cfg = _load_config(PrerankerConfig, config)
        if objective is not None:
            cfg = cfg.model_copy(
                update={
                    "loss": cfg.loss.model_validate(
                        {**cfg.loss.model_dump(), "objective": objective}
                    )
                }
            )
        cutoff, requests, _ = _train_eval_split(run_dir, until, split_quantile)
        store = open_store(run_dir)
        # The pseudo-labels' join only for objectives that train on them: `--objective exposed`
        # runs without the pseudo-label stage.
        joined = join_features(store, requests, cfg.loss.objective in PSEUDO_OBJECTIVES)
        semantics = read_table(run_dir / "sids" / "item_semantics.parquet")
        prepared = prepare(joined, semantics, cfg)
        fitted = fit(prepared, cfg)
        out = save_preranker(
            fitted,
            prepared,
            cfg,
            run_dir / PRERANKER_DIR,
            inputs={
                "requests_before": str(cutoff),
                "rows": requests.num_rows,
                # The registry's version, not the code's: what the join above really used
                # (`gpl export` carries it into the bundle for the service's drift check).
                "feature_service": {
                    "name": FEATURE_SERVICE,
                    "version": store.get_feature_service(FEATURE_SERVICE).tags.get("version"),
                },
            },
        )
        _say(f"pre-ranker ({fitted.objective}) trained on requests before {cutoff} -> {out}")
        for m in (fitted.light, fitted.expressive):
            _say(
                f"  {m.kind}: best epoch {m.best_epoch}/{len(m.epochs)}, "
                f"{m.samples_per_second:,.0f} samples/s, {m.seconds:.1f}s"
            )


@app.command("evaluate")
def evaluate(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: ConfigFile = None,
    truth: Annotated[
        Path | None,
        typer.Option(help="Truth table (contract `truth`); default RUN_DIR/funnel/truth.parquet."),
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Evaluate requests from this time (UTC); train on those before it.",
        ),
    ] = None,
    split_quantile: SplitQuantile = 0.8,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per objective (mean +- std).")] = 3,
    objectives: Annotated[
        str | None,
        typer.Option(help="Comma-separated objectives (default: every baseline and GPL/HAP)."),
    ] = None,
    include_global_negatives: Annotated[
        bool,
        typer.Option(
            help="Score and count the evaluation requests' global_negative rows too (random "
            "catalog negatives that only training uses; by default left out, as serving never "
            "sees them)."
        ),
    ] = False,
    bootstrap_resamples: Annotated[
        int,
        typer.Option(
            min=0,
            help="Resamples of the evaluation requests for the paired bootstrap intervals "
            "against the exposed-only model (0: no intervals; else at least 2).",
        ),
    ] = DEFAULT_RESAMPLES,
    bootstrap_seed: Annotated[
        int,
        typer.Option(min=0, help="Seed of the bootstrap's resamples (same seed: same intervals)."),
    ] = 0,
) -> None:
    """Train every objective on the earlier requests and evaluate on the later ones.

    Needs what `gpl train` needs (the features built and applied, the pseudo-labels) and a truth
    table (RUN_DIR/funnel/truth.parquet from `gpl data simulate`, or --truth).

    Writes RUN_DIR/evaluation/report.md, report.html (plots embedded), report.json: AUC, GAUC,
    HR/Recall/NDCG@K over all and over unexposed candidates, diversity, long-tail recall, each
    method's difference to the exposed-only baseline with a paired request-bootstrap interval
    (--bootstrap-resamples, --bootstrap-seed), and the routing curve (quality vs FLOPs as the
    expressive model's share M grows). The evaluation requests' global_negative rows are left
    out unless --include-global-negatives.
    Warns (and says so in the report) when the anchor LM, the pseudo-labels' calibration or the
    SIDs' collaborative block was fitted on data from after the cutoff.
    """
    import pyarrow.compute as pc

    from training.evaluation.bootstrap import BootstrapSettings
    from training.evaluation.leakage import upstream_leaks
    from training.features.store import open_store
    from training.io import read_table
    from training.preranker.config import OBJECTIVES, PrerankerConfig
    from training.preranker.job import (
        EVALUATION_DIR,
        PSEUDO_OBJECTIVES,
        evaluate_suite,
        join_features,
    )

    with _user_errors():
        # BootstrapSettings refuses 1 too, with a ValueError that names its field, not the
        # flag (and prints a traceback). Negative values never get here (min=0 above).
        if bootstrap_resamples == 1:
            raise UsageError(
                "--bootstrap-resamples must be 0 (no intervals) or at least 2, got 1: one "
                "resample has no spread"
            )
        bootstrap = (
            BootstrapSettings(resamples=bootstrap_resamples, seed=bootstrap_seed)
            if bootstrap_resamples
            else None
        )
        cfg = _load_config(PrerankerConfig, config)
        chosen: list[str] = (
            [o.strip() for o in objectives.split(",") if o.strip()]
            if objectives
            else list(OBJECTIVES)
        )
        unknown = [o for o in chosen if o not in OBJECTIVES]
        if unknown:
            raise UsageError(f"unknown objectives {unknown}; choose from {', '.join(OBJECTIVES)}")
        if objectives is not None and not chosen:
            raise UsageError(f"--objectives names none; choose from {', '.join(OBJECTIVES)}")
        truth_path = truth or run_dir / "funnel" / "truth.parquet"
        truth_table = read_table(truth_path, "truth")
        if not (pc.sum(truth_table.column("label")).as_py() or 0):
            raise UsageError(
                f"{truth_path} has no positive label: every ranking metric would be undefined"
            )
        cutoff, train_requests, eval_requests = _train_eval_split(run_dir, since, split_quantile)
        if eval_requests.num_rows == 0:
            raise UsageError(f"no request at or after {cutoff}: choose an earlier cutoff")
        warnings = upstream_leaks(run_dir, cutoff)
        for warning in warnings:
            typer.echo(f"warning: {warning}", err=True)
        store = open_store(run_dir)
        result = evaluate_suite(
            join_features(store, train_requests, any(o in PSEUDO_OBJECTIVES for o in chosen)),
            join_features(store, eval_requests, labels=False),
            truth_table,
            read_table(run_dir / "sids" / "item_semantics.parquet"),
            read_table(run_dir / "data" / "items.parquet", "items"),
            cfg,
            run_dir / EVALUATION_DIR,
            objectives=chosen,
            seeds=seeds,
            title=f"Pre-ranker evaluation ({run_dir.name}, cutoff {cutoff:%Y-%m-%d %H:%M})",
            warnings=warnings,
            include_global_negatives=include_global_negatives,
            bootstrap=bootstrap,
        )
        if result.global_negatives:
            _say(
                f"{result.global_negatives:,} global_negative rows of the evaluation requests "
                + (
                    "scored with the rest (--include-global-negatives)"
                    if include_global_negatives
                    else "left out (--include-global-negatives keeps them)"
                )
            )
        _say(f"report -> {result.report.markdown} and {result.report.html}")
        keys = ["auc", "unexposed_recall@50", "longtail_recall@50", "ndcg@50"]
        _say(f"{'method':<32}" + "".join(f"{k:>22}" for k in keys))
        for method, runs in result.results.items():
            cells = []
            for k in keys:
                values = [r[k] for r in runs if k in r]
                mean = sum(values) / len(values) if values else float("nan")
                cells.append(f"{mean:>22.4f}")
            _say(f"{method:<32}" + "".join(cells))


@app.command("export")
def export(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    out: Annotated[
        Path | None,
        typer.Option(help="Bundle directory (default RUN_DIR/bundle); replaced atomically."),
    ] = None,
) -> None:
    """Export the trained pre-rankers to an ONNX bundle: RUN_DIR/bundle/.

    Light and expressive models with their preprocessing inside the graph, each also split in
    an item graph (run once per item by the service) and a score graph, a parity check against
    torch on random and real rows for the full and the composed split graphs (max abs
    difference <= 1e-5, else nothing is written), a manifest (FeatureService and version,
    feature order, preprocessing, training metrics, data cutoff, code version) and sha256
    checksums. See docs/export.md.
    """
    from export.bundle import export_bundle

    with _user_errors():
        target = out or run_dir / "bundle"
        result = export_bundle(run_dir / "preranker", target, run_dir=run_dir)
        parity = result.manifest.get("parity", {})
        _say(f"bundle -> {result.path} ({result.seconds:.1f}s)")
        if parity:
            checks = parity.get("checks", [])
            graphs = sorted({c["model"] for c in checks})
            _say(
                f"  parity: max |p_onnx - p_torch| {parity.get('max_abs_diff', 0.0):.2g} "
                f"(tolerance {parity.get('tolerance')}) over {len(checks)} checks of "
                f"{', '.join(graphs)}"
            )


class ServerLogLevel(enum.StrEnum):
    """uvicorn's log levels (``GPL_SERVE_LOG_LEVEL``)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


@app.command("serve")
def serve(
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            envvar="GPL_RUN_DIR",
            help="Run directory holding the bundle and feature_store.yaml (env GPL_RUN_DIR, "
            "else GPL_SERVE_RUN_DIR; default runs/demo).",
        ),
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default RUN_DIR/bundle).")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (env GPL_SERVE_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (env GPL_SERVE_PORT; default 8000).")
    ] = None,
    max_candidates: Annotated[
        int | None, typer.Option(help="Most candidates per request (default 10,000).")
    ] = None,
    as_of: Annotated[
        datetime | None,
        typer.Option(
            formats=TIME_FORMATS,
            help="Judge feature ttl as if it were this time (replaying historical data only).",
        ),
    ] = None,
    log_level: Annotated[
        ServerLogLevel | None,
        typer.Option(help="uvicorn log level (env GPL_SERVE_LOG_LEVEL; default info)."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes, each with its own item cache and models (more cores: more "
            "workers; ONNX Runtime already uses every core of one).",
        ),
    ] = 1,
) -> None:
    """Serve the pre-ranker over HTTP (uvicorn) from online features only.

    POST /v1/prerank {"user_id": ..., "candidates": [...], "top_k": 10} returns the top-k with
    scores and stats. Also: GET /v1/health, /v1/ready, /metrics (Prometheus), /v1/models,
    /v1/registry/feature-views[/{name}], POST /v1/admin/reload (needs GPL_SERVE_ADMIN_TOKEN),
    and the OpenAPI docs at /docs. The online store is the run's (SQLite, or Redis with
    GPL_REDIS_URL); every other setting is a GPL_SERVE_* variable (see docs/serving.md).
    """
    import uvicorn

    from export.bundle import verify_bundle
    from gpl_service.app import create_app, open_service_store
    from gpl_service.settings import ServeSettings

    with _user_errors():
        # Only what was given on the command line overrides the GPL_SERVE_* environment.
        given: dict[str, Any] = {
            "run_dir": run_dir,
            "bundle_dir": bundle,
            "host": host,
            "port": port,
            "max_candidates": max_candidates,
            "as_of": None if as_of is None else _as_utc(as_of),
            "log_level": None if log_level is None else log_level.value,
        }
        overrides = {k: v for k, v in given.items() if v is not None}
        settings = ServeSettings(**overrides)
        # Fail here, in one line, rather than in uvicorn's start-up traceback.
        open_service_store(settings.run_dir)
        verify_bundle(settings.bundle_path)
    if workers == 1:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
        return
    # Worker processes build the app from an import string and read their settings from the
    # environment, so this command's options travel as GPL_SERVE_* variables.
    for name, value in overrides.items():
        os.environ[f"GPL_SERVE_{name.upper()}"] = (
            value.isoformat() if isinstance(value, datetime) else str(value)
        )
    uvicorn.run(
        "gpl_service.app:create_app",
        factory=True,
        workers=workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )


DEMO_FUNNEL_CONFIG: Final[dict[str, Any]] = {
    "retrieval_size": 150,
    "prerank_size": 60,
    "rank_size": 20,
}
DEMO_PRERANKER_CONFIG: Final[dict[str, Any]] = {"training": {"epochs": 6}}
DEMO_ANCHORS_CONFIG: Final[dict[str, Any]] = {
    "model": {
        "compact": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 384}
    },
    "sequences": {"max_history": 20},
    "training": {"loss_on": "all", "eval_users": 100, "patience": 2},
    "generation": {"beam_width": 10},
}


# Stage -> (module, settings model, the commands whose --config reads it).
CONFIG_STAGES: Final[dict[str, tuple[str, str, str]]] = {
    "synth": ("training.data.synthetic", "SynthConfig", "gpl data synth"),
    "simulate": ("training.data.simulator", "SimulatorConfig", "gpl data simulate"),
    "features": ("training.features.stats", "StatsConfig", "gpl features build"),
    "sids": ("training.sids.config", "SidConfig", "gpl sids train"),
    "anchors": ("training.anchors.job", "AnchorConfig", "gpl anchors train / generate"),
    "pseudo-labels": ("training.pseudo_labels.job", "PseudoLabelConfig", "gpl pseudo-labels"),
    "preranker": ("training.preranker.config", "PrerankerConfig", "gpl train / evaluate"),
}


@app.command("config")
def config_cmd(
    stage: Annotated[
        str,
        typer.Argument(help=f"One of: {', '.join(CONFIG_STAGES)}.", show_default=False),
    ],
) -> None:
    """Print a stage's settings with their defaults, each explained, as a --config YAML file.

    Save it, keep the lines you change (unknown keys are rejected, omitted ones keep their
    defaults) and pass it with --config:

        gpl config sids > sids.yaml && gpl sids train --config sids.yaml
    """
    import importlib

    from gpl_service.config_docs import settings_yaml

    with _user_errors():
        if stage not in CONFIG_STAGES:
            raise UsageError(f"unknown stage {stage!r}; one of: {', '.join(CONFIG_STAGES)}")
        module, name, commands = CONFIG_STAGES[stage]
        model = getattr(importlib.import_module(module), name)
        title = f"Settings of `{commands}` ({name}), with their defaults. Pass with --config."
        typer.echo(settings_yaml(model, title), nl=False)


@app.command("demo")
def demo(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    n_items: Annotated[
        int,
        typer.Option(
            min=64,
            help="Synthetic catalog size (below 1,024 the SID codebooks shrink to fit it).",
        ),
    ] = 2000,
    n_users: Annotated[int, typer.Option(help="Synthetic users.")] = 500,
    lm_epochs: Annotated[int, typer.Option(help="Anchor LM training epochs.")] = 4,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Local checkpoint to tune with LoRA instead of the demo's compact anchor LM "
            "(e.g. one written by `python -m training.anchors.base_checkpoint`)."
        ),
    ] = None,
    collaborative_weight: Annotated[
        float,
        typer.Option(
            help="Fuse a collaborative block, built from the interactions before the report's "
            "cutoff, into the item space with this weight (see `gpl sids train --help`); "
            "0: content only."
        ),
    ] = 0.0,
) -> None:
    """Run the whole pipeline on a synthetic catalog, printing row counts and timings.

    synth -> simulate -> sids -> anchors (train, generate) -> pseudo-labels -> Feast features
    (build, apply, materialize) -> point-in-time training set -> pre-ranker train -> evaluation
    report (one seed; `gpl evaluate` defaults to three) -> ONNX export (parity-checked) -> the
    service started on the bundle, one request scored from online features, stopped.
    """
    timings: dict[str, float] = {}
    # The demo's anchor LM is a small one (2 layers, 128 wide, 20-item histories, beam 10) trained
    # on whole windows, so the stage takes about a minute on two CPU cores; the file doubles as a
    # config example.
    configs = run_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    anchors_config = configs / "anchors.yaml"
    anchors_config.write_text(yaml.safe_dump(DEMO_ANCHORS_CONFIG, sort_keys=False))
    # A narrower funnel (150 retrieved, 60 pre-ranked, 20 ranked, 10 exposed per request) and a
    # short pre-ranker schedule keep the demo's training and evaluation to a few minutes.
    funnel_config = configs / "funnel.yaml"
    funnel_config.write_text(yaml.safe_dump(DEMO_FUNNEL_CONFIG, sort_keys=False))
    # `gpl train` and `gpl evaluate` cut the request log at this quantile of its times; the
    # anchor LM, the pseudo-labels' calibration and any collaborative block are fitted before
    # the same cutoff, or the report would score GPL on a period they had already seen.
    split_quantile = 0.8

    @functools.cache  # read once, after `data simulate` wrote the log
    def cutoff() -> datetime:
        import pyarrow.parquet as pq

        from training.preranker.job import time_quantile

        times = pq.read_table(run_dir / "funnel" / "requests.parquet", columns=["event_timestamp"])
        moment: datetime = time_quantile(times, split_quantile)
        return moment

    preranker_config = configs / "preranker.yaml"
    preranker_config.write_text(yaml.safe_dump(DEMO_PRERANKER_CONFIG, sort_keys=False))
    # The default codebooks (256 codes) need a catalog several times their size; a smaller demo
    # catalog gets the largest power of two that leaves about four items a code.
    sids_config: Path | None = None
    if n_items < 1024:
        sids_config = configs / "sids.yaml"
        size = 1 << max(3, (n_items // 4).bit_length() - 1)
        sids_config.write_text(yaml.safe_dump({"codebook_size": size}, sort_keys=False))
    steps: list[tuple[str, Callable[[], None]]] = [
        (
            "data synth",
            lambda: data_synth(
                run_dir=run_dir, n_items=n_items, n_users=n_users, config=None, seed=None
            ),
        ),
        (
            "data simulate",
            lambda: data_simulate(
                run_dir=run_dir, config=funnel_config, seed=None, requests_per_user=None
            ),
        ),
        (
            "sids train",
            lambda: sids_train(
                run_dir=run_dir,
                config=sids_config,
                method=None,
                encoder=None,
                collaborative_weight=collaborative_weight,
                collaborative_until=cutoff() if collaborative_weight > 0 else None,
            ),
        ),
        (
            "anchors train",
            lambda: anchors_train(
                run_dir=run_dir,
                config=anchors_config,
                base_model=base_model,
                until=cutoff(),
                epochs=lm_epochs,
                ensemble_size=None,
            ),
        ),
        (
            "anchors generate",
            lambda: anchors_generate(
                run_dir=run_dir, config=anchors_config, implementation=None, prior_weight=None
            ),
        ),
        (
            "pseudo-labels",
            lambda: pseudo_labels(
                run_dir=run_dir,
                config=None,
                include_global_negatives=None,
                calibrate_until=cutoff(),
            ),
        ),
        ("features build", lambda: features_build(run_dir=run_dir, config=None)),
        ("features apply", lambda: features_apply(run_dir=run_dir)),
        (
            "features materialize",
            lambda: features_materialize(run_dir=run_dir, end=None, full=True),
        ),
        (
            "features training-set",
            lambda: features_training_set(run_dir=run_dir, service="preranker"),
        ),
        (
            "train",
            lambda: train(
                run_dir=run_dir,
                config=preranker_config,
                objective=None,
                until=None,
                split_quantile=split_quantile,
            ),
        ),
        (
            "evaluate",
            lambda: evaluate(
                run_dir=run_dir,
                config=preranker_config,
                truth=None,
                since=None,
                split_quantile=split_quantile,
                seeds=1,
                objectives="exposed,gpl,hap,gpl_hap",
            ),
        ),
        ("export", lambda: export(run_dir=run_dir, out=None)),
        ("serve", lambda: _demo_serve(run_dir)),
    ]
    for label, step in steps:
        with _timed(label, timings):
            step()
    _say("\nstage                      seconds")
    for label, seconds in timings.items():
        _say(f"{label:<26} {seconds:7.2f}")
    _say(f"{'total':<26} {sum(timings.values()):7.2f}")
    _say(f"outputs in {run_dir}; browse the feature registry with: feast -c {run_dir} ui")
    _say(
        f"keep the service running with: gpl serve --run-dir {run_dir} --as-of {_data_end(run_dir)}"
    )


def _data_end(run_dir: Path) -> str:
    """The last request time of the run's log (the demo's data ends in the past)."""
    import pyarrow.compute as pc

    from training.io import read_table

    requests = read_table(run_dir / "funnel" / "requests.parquet")
    end: datetime = pc.max(requests.column("event_timestamp")).as_py()
    return end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")


def _demo_serve(run_dir: Path) -> None:
    """Start `gpl serve`, send the latest logged request, print the answer, stop the service."""
    import subprocess
    import sys

    import httpx
    import pyarrow.compute as pc

    from gpl_service.process import ServerStartError, free_port, wait_ready
    from training.io import read_table

    requests = read_table(run_dir / "funnel" / "requests.parquet")
    last = requests.sort_by([("event_timestamp", "descending")]).slice(0, 1)
    request_id = last.column("request_id")[0].as_py()
    sample = requests.filter(pc.equal(requests.column("request_id"), request_id))
    body = {
        "user_id": sample.column("user_id")[0].as_py(),
        "candidates": sample.column("item_id").to_pylist(),
        "top_k": 10,
        "request_id": f"demo-{request_id}",
    }
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gpl_service.cli",
        "serve",
        "--run-dir",
        str(run_dir),
        "--port",
        str(port),
        "--as-of",
        _data_end(run_dir),
        "--log-level",
        "warning",
    ]
    _say("$ gpl " + " ".join(cmd[3:]))
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(proc, f"{url}/v1/ready", timeout=120)
        except ServerStartError as exc:
            raise UsageError(str(exc)) from exc
        _say(f"POST {url}/v1/prerank user {body['user_id']}, {len(body['candidates'])} candidates")
        answer = httpx.post(f"{url}/v1/prerank", json=body, timeout=30)
        answer.raise_for_status()
        got = answer.json()
        _say(f"  model {got['model_version']}, degraded={got['degraded']}")
        labels = dict(
            zip(
                sample.column("item_id").to_pylist(),
                sample.column("label").to_pylist(),
                strict=True,
            )
        )
        logged = {1: "clicked in the log", 0: "exposed, not clicked", None: "not exposed"}
        for rank, item in enumerate(got["items"], start=1):
            what = logged.get(labels.get(item["item_id"]), "")
            _say(
                f"  {rank:>2}. {item['item_id']:<10} {item['score']:.4f} {item['model']:<10} {what}"
            )
        stats = {k: v for k, v in got["stats"].items() if k != "feature_age_seconds"}
        _say(f"  stats: {json.dumps(stats)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    _say("service stopped")


def main() -> None:
    """Entry point for ``python -m gpl_service.cli``."""
    app(prog_name="gpl")


if __name__ == "__main__":
    main()
