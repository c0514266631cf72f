"""Fixtures shared by the tests and the benchmarks: tiny and real-shaped models built on the spot.

Not used when serving; labelled as such, as ``torch.testing`` is.
"""
