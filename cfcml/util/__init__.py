"""The lowest layer: small helpers every other layer may use (errors, redaction, metric names).

Nothing here imports another cfcml package, torch, Ray or MLflow.
"""
