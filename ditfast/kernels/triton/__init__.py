"""Triton kernels, one module per op family (``modulate``, ...), each with its launchers.

Importing a module here imports triton; ditfast.ops does that lazily, on the first call that runs
the "triton" backend. On CPU tensors the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""
