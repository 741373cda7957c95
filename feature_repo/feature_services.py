"""Feast feature services: the one contract between training and serving.

The pre-ranker is trained from ``get_historical_features(features=preranker)`` and served from
``get_online_features(features=preranker)``; neither side lists feature names by hand, so they
cannot drift apart.
"""

from feast import FeatureService

from feature_repo.feature_views import (
    item_content,
    item_popularity,
    pseudo_labels,
    user_activity,
    user_history,
    user_interest_anchors,
)

preranker = FeatureService(
    name="preranker",
    features=[
        user_activity,
        user_history,
        # Only the anchors' item ids: their embeddings come from the item_semantics table that
        # training and the service both hold in memory, so no row carries 10 x 384 floats.
        user_interest_anchors[["anchor_item_ids"]],
        item_content,
        item_popularity,
    ],
    description="Every feature the pre-ranker reads, for training (offline) and serving (online).",
    tags={"version": "2"},
)

training_labels = FeatureService(
    name="training_labels",
    features=[pseudo_labels],
    description="Labels beyond the request log that training joins point-in-time; never served.",
    tags={"version": "1"},
)

FEATURE_SERVICES = [preranker, training_labels]
