"""Thin adapters of `stabilitycheck.watch` to training frameworks (each in its own optional extra)."""
