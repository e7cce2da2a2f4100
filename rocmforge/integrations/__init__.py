"""Bridges between rocmforge and other libraries; each module needs that library
(``rocmforge.integrations.transformers``: torch and transformers)."""
