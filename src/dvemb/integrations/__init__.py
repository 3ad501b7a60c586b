"""Integrations with training frameworks; each submodule needs its framework (``dvemb.integrations.hf``: the hf extra)."""
