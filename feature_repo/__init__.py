"""The Feast feature repository: entities, sources, views and services of the pre-ranker.

:func:`definitions` returns every object to ``FeatureStore.apply``; the ``gpl features apply``
command uses it, and so does ``feast apply`` run in this directory.
"""

from typing import Any


def definitions() -> list[Any]:
    """All Feast objects of this repository, in dependency order."""
    from feature_repo import data_sources, entities, feature_services, feature_views

    return [
        entities.user,
        entities.item,
        entities.request,
        data_sources.item_content_source,
        data_sources.item_popularity_source,
        data_sources.user_activity_source,
        data_sources.user_history_source,
        data_sources.item_semantics_source,
        data_sources.user_interest_anchors_source,
        data_sources.pseudo_labels_source,
        *feature_views.FEATURE_VIEWS,
        *feature_services.FEATURE_SERVICES,
    ]
