"""Feast batch sources: the parquet tables the offline stages write into a run directory.

Paths are relative to the run directory (the offline store's ``data_dir``, by default the Feast
``repo_path``), so one set of definitions serves every run, test and deployment; the stage that
writes each table is named in its description.
"""

from feast import FileSource

TIMESTAMP_FIELD = "event_timestamp"

item_content_source = FileSource(
    name="item_content_source",
    path="features/item_content.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description="Per-item content statistics from the catalog (`gpl features build`).",
)

item_popularity_source = FileSource(
    name="item_popularity_source",
    path="features/item_popularity.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Daily point-in-time snapshots of item funnel statistics, each computed from request-log "
        "events strictly before its timestamp (`gpl features build`)."
    ),
)

user_activity_source = FileSource(
    name="user_activity_source",
    path="features/user_activity.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Daily point-in-time snapshots of user activity and profile statistics, each computed "
        "from request-log events strictly before its timestamp (`gpl features build`)."
    ),
)

user_interest_anchors_source = FileSource(
    name="user_interest_anchors_source",
    path="anchors/user_interest_anchors.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Interest anchors per user, one row per anchor-set cutoff: generated offline by the "
        "anchor LM from history strictly before the cutoff (`gpl anchors generate`)."
    ),
)

pseudo_labels_source = FileSource(
    name="pseudo_labels_source",
    path="pseudo_labels/pseudo_labels.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Pseudo-labels of unexposed candidates, stamped with their request's time "
        "(`gpl pseudo-labels`)."
    ),
)

item_semantics_source = FileSource(
    name="item_semantics_source",
    path="sids/item_semantics.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Per-item Semantic IDs and frozen content-encoder vectors, one row per item stamped with "
        "the item's own timestamp (`train_sids` / `assign_sids`, training/sids)."
    ),
)

user_history_source = FileSource(
    name="user_history_source",
    path="features/user_history.parquet",
    timestamp_field=TIMESTAMP_FIELD,
    description=(
        "Daily snapshots of each user's latest positives, oldest first (`gpl features build`)."
    ),
)
