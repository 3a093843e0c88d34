"""Measurement and tracking: a model's sizes, accuracy and latency; the MLflow run; the metric-key schema."""
