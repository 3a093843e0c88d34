"""Lightning callbacks that change a model while it trains (pruning, QAT, clustering)."""
