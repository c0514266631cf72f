"""Serving on a Ray cluster: the same app as Serve's ingress, engines as multiplexed replicas.

Ray is imported only inside this package, and only when ``serve --ray`` is used.
"""
