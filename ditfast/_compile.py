"""torch.compile helpers that do not import torch._dynamo when ditfast is imported."""


def constant_for_compile(fn):
    """Mark ``fn`` so torch.compile calls it at trace time and bakes its result in as a constant.

    This is what ``torch.compiler.assume_constant_result`` does (it sets this attribute); calling that
    decorator at import time would import torch._dynamo, and with it triton, whenever ditfast is
    imported. Use it for host-side lookups (device capability, backend probes) whose result is fixed
    for a process.
    """
    fn._dynamo_marked_constant = True
    return fn
