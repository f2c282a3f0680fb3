"""Pipeline stages: thin entry points over the pure modules (one module per stage)."""
