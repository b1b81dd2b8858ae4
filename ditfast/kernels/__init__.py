"""ditfast.kernels: the fast implementations behind ditfast.ops.

``kernels.triton`` holds the Triton kernels and their Python launchers. Nothing here is imported by
``import ditfast``; the ops import a kernel module on first use, so a missing Triton never breaks
the package.
"""
