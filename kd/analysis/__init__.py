"""Reading the store back: the comparison report and its plots, REPRODUCTIONS.md, the model registry."""
