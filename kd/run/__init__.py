"""One run, from the resolved config to its summary: the orchestrator and the steps it calls."""
