"""Offline search for static pruning plans (DEAP): head masks, layer sets, per-layer rates, NSGA-II."""
