"""Training: the Lightning modules, the trainer, the teacher (and its cache), saving and loading weights."""
