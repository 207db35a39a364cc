"""Learning: the shared trainer and its callbacks, evaluation, the continual-learning metrics and plots, the configured
run context, and the learning driver.
"""
