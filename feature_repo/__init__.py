"""The Feast feature repository: entities, sources, views and services of the pre-ranker.

:func:`definitions` returns every object to ``FeatureStore.apply``; ``gpl features apply`` uses
it. The folder is a Python package, not a ``feast apply`` repo (it has no
``feature_store.yaml``, and ``feast apply`` would import each module as a definition file):
``gpl features apply --run-dir RUN`` writes the run's ``feature_store.yaml`` and registers these
objects, after which ``feast -c RUN ...`` (``ui``, ``feature-views list``) works on that run.
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
