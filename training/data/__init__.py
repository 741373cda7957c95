"""Data contract, dataset loaders, synthetic generator and funnel simulator."""
