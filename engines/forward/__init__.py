"""The forward pass: every device-specific line of a decode or prefill step.

``layout`` says what a model's projections are and how they fuse; ``lean`` is the decode step in plain
torch; ``compiled`` and ``kernels`` (with ``gemm.c``) the CPU's compiled step and products; ``int8`` the
CPU's int8 weights; ``kvcache`` the batch's cache; ``multilora`` unmerged adapters as per-row hooks; ``run``
the scheduler's one door into a forward pass.
"""
