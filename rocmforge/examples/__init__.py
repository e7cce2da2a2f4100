"""Runnable examples: ``python -m rocmforge.examples.<name>``."""
