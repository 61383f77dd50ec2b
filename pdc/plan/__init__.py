"""The plan layer: what a checked spec will do, before any weight is read.

`stage_graph` orders the stages and names each one's inputs; `dry_run` turns a spec into the
plan tables; `results` holds the typed results that every stage returns and every reader
(runner, report, lock, `pdc check`) reads back. Nothing here loads model weights.
"""
