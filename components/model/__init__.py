"""The model plane: backbones, prompts, task data, pools and their merging, the pool engines, the embedding cache and
the learner-state bundle.
"""
