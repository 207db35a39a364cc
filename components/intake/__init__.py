"""Intake and the data plane: drops read from folders or S3, images checked and decoded, validation (Great
Expectations), shards, git + DVC, the task ledger, the workspace and ingestion.
"""
