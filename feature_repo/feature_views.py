"""Feast feature views. Feature names live here once; training and serving both read them.

Every field carries a ``description`` and a ``default`` tag: the value the training-set builder
and the online service substitute when the view has no row for an entity at a given time
(together with the view's ``<view>__missing`` indicator), so both sides fill gaps identically.
"""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Float32, Int64, String

from feature_repo.data_sources import (
    item_content_source,
    item_popularity_source,
    user_activity_source,
)
from feature_repo.entities import item, user

item_content = FeatureView(
    name="item_content",
    entities=[item],
    # Content does not go stale: a catalog row stays valid until the item's text is replaced.
    ttl=timedelta(0),
    schema=[
        Field(name="item_id", dtype=String, description="Item key."),
        Field(
            name="text_num_words",
            dtype=Int64,
            description="Number of whitespace-separated words in the item text.",
            tags={"default": "0"},
        ),
        Field(
            name="category",
            dtype=String,
            description="Main category of the item, empty when the catalog has none.",
            tags={"default": ""},
        ),
    ],
    source=item_content_source,
    online=True,
    description="Item content statistics from the catalog.",
    tags={"stage": "features", "owner": "gpl"},
)

item_popularity = FeatureView(
    name="item_popularity",
    entities=[item],
    # Snapshots are daily; a snapshot older than 30 days describes a different popularity regime,
    # and the default (plus the missing indicator) is more honest than a month-old count.
    ttl=timedelta(days=30),
    schema=[
        Field(name="item_id", dtype=String, description="Item key."),
        Field(
            name="candidate_count",
            dtype=Int64,
            description="Times the item entered any request's funnel before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="impressions",
            dtype=Int64,
            description="Times the item was exposed before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="clicks",
            dtype=Int64,
            description="Clicks on the item before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="ctr_smoothed",
            dtype=Float32,
            description="CTR with a Beta prior: (clicks + a) / (impressions + a + b).",
            tags={"default": "0.0"},
        ),
        Field(
            name="exposure_rate",
            dtype=Float32,
            description="Share of the item's funnel entries that reached exposure.",
            tags={"default": "0.0"},
        ),
        Field(
            name="log_candidate_count",
            dtype=Float32,
            description="log(1 + candidate_count): popularity on a scale a model can use.",
            tags={"default": "0.0"},
        ),
    ],
    source=item_popularity_source,
    online=True,
    description="Item funnel and popularity statistics, daily point-in-time snapshots.",
    tags={"stage": "features", "owner": "gpl"},
)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    # A user's activity profile older than 90 days no longer predicts today's behaviour.
    ttl=timedelta(days=90),
    schema=[
        Field(name="user_id", dtype=String, description="User key."),
        Field(
            name="requests",
            dtype=Int64,
            description="Requests served to the user before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="impressions",
            dtype=Int64,
            description="Items exposed to the user before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="clicks",
            dtype=Int64,
            description="Clicks by the user before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="ctr_smoothed",
            dtype=Float32,
            description="User click-through rate with a Beta prior.",
            tags={"default": "0.0"},
        ),
        Field(
            name="active_days",
            dtype=Int64,
            description="Distinct days with at least one request before the snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="clicked_popularity_mean",
            dtype=Float32,
            description=(
                "Mean log(1 + candidate_count) of the items the user clicked, measured when "
                "clicked: the user's taste for popular versus niche items."
            ),
            tags={"default": "0.0"},
        ),
    ],
    source=user_activity_source,
    online=True,
    description="User activity and profile statistics, daily point-in-time snapshots.",
    tags={"stage": "features", "owner": "gpl"},
)

FEATURE_VIEWS = [item_content, item_popularity, user_activity]
