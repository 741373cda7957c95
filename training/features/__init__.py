"""Feast integration: the offline store plugin, statistics features, training sets."""
