"""Feast feature views. Feature names live here once; training and serving both read them.

Every field carries a ``description`` and a ``default`` tag: the value the training-set builder
and the online service substitute when the view has no row for an entity at a given time
(together with the view's ``<view>__missing`` indicator), so both sides fill gaps identically.
"""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float32, Int32, Int64, String

from feature_repo.data_sources import (
    item_content_source,
    item_popularity_source,
    item_semantics_source,
    pseudo_labels_source,
    user_activity_source,
    user_history_source,
    user_interest_anchors_source,
)
from feature_repo.entities import item, request, user

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
    # A row is written only on a day the item had funnel activity, and its counts are all-time,
    # so an old row is still exact: the ttl is a policy, not staleness. An item no funnel has
    # shown for 30 days is treated as cold (defaults plus the missing indicator), like a new
    # item, so the light model does not rank it by a popularity it no longer has; training and
    # serving apply it identically. Set ttl to 0 to keep such counts forever.
    ttl=timedelta(days=30),
    schema=[
        Field(name="item_id", dtype=String, description="Item key."),
        Field(
            name="candidate_count",
            dtype=Int64,
            description="Times the item entered a request's funnel before the snapshot (global "
            "random negatives, never in the funnel, not counted).",
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
            description="Clicks on the item known before the snapshot (by label_timestamp).",
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
    # Written only on a day the user was active, with all-time counts: an old row is exact, and
    # the ttl is a policy. A user away for 90 days is scored as a returning cold user (defaults
    # plus the missing indicator) rather than by a profile of another season.
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
            description="Clicks by the user known before the snapshot (by label_timestamp).",
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
            description="Distinct days with a request or a click becoming known, before the "
            "snapshot.",
            tags={"default": "0"},
        ),
        Field(
            name="clicked_popularity_mean",
            dtype=Float32,
            description=(
                "Mean log(1 + candidate_count) of the items the user clicked, as known at "
                "their impressions: the user's taste for popular versus niche items."
            ),
            tags={"default": "0.0"},
        ),
    ],
    source=user_activity_source,
    online=True,
    description="User activity and profile statistics, daily point-in-time snapshots.",
    tags={"stage": "features", "owner": "gpl"},
)

user_interest_anchors = FeatureView(
    name="user_interest_anchors",
    entities=[user],
    # Anchors describe interests as of their cutoff; interests drift, and a set older than 30
    # days should fall back to "no anchors" (missing indicator) rather than steer scoring.
    ttl=timedelta(days=30),
    schema=[
        Field(name="user_id", dtype=String, description="User key."),
        Field(
            name="anchor_sids",
            dtype=Array(String),
            description="Generated Semantic IDs, best first.",
            tags={"default": "[]"},
        ),
        Field(
            name="anchor_item_ids",
            dtype=Array(String),
            description="The item each anchor SID denotes.",
            tags={"default": "[]"},
        ),
        Field(
            name="anchor_log_probs",
            dtype=Array(Float32),
            description="Sequence log-probability of each anchor under the anchor LM, fused with "
            "the item co-occurrence prior when its weight is positive (docs/anchors.md).",
            tags={"default": "[]"},
        ),
        Field(
            name="num_anchors",
            dtype=Int32,
            description="Number of anchors in the set.",
            tags={"default": "0"},
        ),
        Field(
            name="history_length",
            dtype=Int32,
            description="Positives in the history the anchors were generated from.",
            tags={"default": "0"},
        ),
    ],
    source=user_interest_anchors_source,
    online=True,
    description="GPL interest anchors of each user, versioned by history cutoff. The anchors' "
    "content vectors are the offline-only view user_interest_anchor_embeddings.",
    tags={"stage": "anchors", "owner": "gpl"},
)

# The anchors' vectors, kept out of the online store: serving looks each anchor's vector up in
# item_semantics, which it holds in memory, so ~15 KB a user (10 x 384 float32) online would
# only cost space and materialization time (20,000 sets into Redis: 329 -> 15 MB, 26 -> 13 s).
user_interest_anchor_embeddings = FeatureView(
    name="user_interest_anchor_embeddings",
    entities=[user],
    # The same rows as user_interest_anchors, so the same expiry: a set older than 30 days
    # counts as missing.
    ttl=timedelta(days=30),
    schema=[
        Field(name="user_id", dtype=String, description="User key."),
        Field(
            name="anchor_embeddings",
            dtype=Array(Float32),
            description="Anchors' content embeddings, flattened row-major (num_anchors x dim), "
            "in the order of user_interest_anchors' anchor_item_ids.",
            tags={"default": "[]"},
        ),
    ],
    source=user_interest_anchors_source,
    online=False,
    description="Content vectors of each user's GPL interest anchors, for offline "
    "point-in-time joins only (serving reads item_semantics instead).",
    tags={"stage": "anchors", "owner": "gpl"},
)

pseudo_labels = FeatureView(
    name="pseudo_labels",
    entities=[request, item],
    # Keyed by request: a row can only ever join its own request, so it needs no expiry.
    ttl=timedelta(0),
    schema=[
        Field(name="request_id", dtype=String, description="Request key."),
        Field(name="item_id", dtype=String, description="Item key."),
        Field(
            name="pseudo_label",
            dtype=Float32,
            description="Calibrated click probability of the unexposed candidate.",
            # NaN, not 0: a candidate without a pseudo-label must never look like a negative.
            tags={"default": "nan"},
        ),
        Field(
            name="confidence",
            dtype=Float32,
            description="Confidence weight in [0, 1]: weighted geometric mean of the "
            "dispersion, history and LM factors (default: historical consistency alone, as the "
            "anchor set's coverage of the user's history).",
            tags={"default": "nan"},
        ),
        Field(
            name="relevance",
            dtype=Float32,
            description="Max cosine of the candidate to the user's anchors.",
            tags={"default": "nan"},
        ),
        Field(
            name="status",
            dtype=String,
            description="ok, no_anchors or no_item_embedding; 'absent' (the default) when the "
            "job wrote no row for the candidate (an exposed or unknown one).",
            tags={"default": "absent"},
        ),
    ],
    source=pseudo_labels_source,
    # Labels are for training only; serving never reads them.
    online=False,
    description="GPL pseudo-labels of unexposed candidates (training only).",
    tags={"stage": "pseudo_labels", "owner": "gpl"},
)

item_semantics = FeatureView(
    name="item_semantics",
    entities=[item],
    # A SID identifies the item's content and does not go stale with time. Re-tokenizing (a new
    # `gpl sids train`) rewrites the rows with their old timestamps: bring them online with
    # `gpl features materialize --full` (an incremental load warns that it cannot).
    ttl=timedelta(0),
    schema=[
        Field(name="item_id", dtype=String, description="Item key."),
        Field(
            name="sid",
            dtype=String,
            description="Semantic ID as tokens, e.g. <a_12><b_7><c_201><d_0>: residual codes, "
            "then the index that makes it unique. Empty when the item has none.",
            tags={"default": ""},
        ),
        Field(
            name="sid_codes",
            dtype=Array(Int32),
            description="The Semantic ID's codes, one per level, the disambiguation index last.",
            tags={"default": "[]"},
        ),
        Field(
            name="content_embedding",
            dtype=Array(Float32),
            description="L2-normalized vector of the frozen content encoder (the text, fused with "
            "the catalog's content_embedding when given) that the SID quantizes; with the SID "
            "stage's collaborative block on, also the items' co-engagement before its "
            "--collaborative-until, whatever the row's timestamp (not point-in-time safe "
            "then: join it only for requests after that time).",
            tags={"default": "[]"},
        ),
    ],
    source=item_semantics_source,
    online=True,
    description="Item Semantic IDs and content vectors from the SID stage.",
    tags={"stage": "sids", "owner": "gpl"},
)

user_history = FeatureView(
    name="user_history",
    entities=[user],
    # Written only on a day the user gained a positive: a row 90 days old is still the user's
    # latest history, but says little about today's interests; past it the model sees the
    # empty default and the missing indicator (a policy, applied alike in training and serving).
    ttl=timedelta(days=90),
    schema=[
        Field(name="user_id", dtype=String, description="User key."),
        Field(
            name="recent_item_ids",
            dtype=Array(String),
            description="The user's latest positives before the snapshot, oldest first (at most "
            "StatsConfig.history_length); the expressive pre-ranker attends over their content "
            "embeddings.",
            tags={"default": "[]"},
        ),
    ],
    source=user_history_source,
    online=True,
    description="Recent positive items of each user, daily point-in-time snapshots.",
    tags={"stage": "features", "owner": "gpl"},
)

FEATURE_VIEWS = [
    item_content,
    item_popularity,
    user_activity,
    user_history,
    user_interest_anchors,
    user_interest_anchor_embeddings,
    pseudo_labels,
    item_semantics,
]
