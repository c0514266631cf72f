"""Adapters: which adapter a name means, its files and config, and how it is served (merged or attached).

``files`` resolves and fetches an adapter and checks its files; ``config`` validates
``adapter_config.json``; ``pickle_weights`` reads ``adapter_model.bin`` weights-only; ``variants`` decides
whether an adapter fits a base and builds its merged or unmerged variant.
"""
