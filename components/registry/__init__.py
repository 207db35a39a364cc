"""Registry and governance: MLflow versions, runs and review pages, the artifacts pinned per version, the promotion
gate, lineage, data collection, and the served model.
"""
