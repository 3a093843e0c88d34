"""Model surgery the compression stages call: layer selection, channel removal, low-rank factors, Deep Compression, pruning sensitivity."""
