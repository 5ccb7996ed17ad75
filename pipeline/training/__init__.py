"""Training: configuration, the loop, loss terms and their weights, runtime helpers, distributed
data parallel."""
