"""Training data: the official dataset layout, on-the-fly degradation and preprocessing."""
