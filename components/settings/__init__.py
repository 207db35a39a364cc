"""Configuration: the typed settings and their defaults (``config``), how they are resolved (``config_loading``), and
credentials kept out of everything written (``credentials``).
"""
