"""Offline pipeline stages, one subpackage each: data, features, sids, anchors, pseudo-labels."""
