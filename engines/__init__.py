"""Model side of peft-gateway: names, catalog, adapter resolution, loading, merging, pooling, generation.

Nothing here imports the HTTP layer; the gateway talks to it through plain dataclasses.
"""
