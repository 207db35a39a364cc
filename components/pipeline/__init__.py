"""The night's steps as plain functions: the chain's state, review decisions, the steps themselves and where their
inputs and outputs live.
"""
