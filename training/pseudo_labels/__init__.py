"""GPL pseudo-labels for unexposed candidates: relevance to interest anchors x confidence."""
