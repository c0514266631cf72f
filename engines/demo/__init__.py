"""The built-in demo: a tiny base that answers in English and a LoRA adapter that answers in Chinese.

``content`` holds what they answer, ``train`` how they are trained, ``models`` where the weights are
(shipped in ``weights/``, else built into the cache); ``python -m engines.demo --build`` rebuilds them.
"""
