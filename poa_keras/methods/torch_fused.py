"""Multi-tensor fast paths of a training step's per-variable loops, for the PyTorch backend.

On JAX and TensorFlow the step is one compiled program and XLA fuses the per-variable work of
`PlannedTrainer` (gradient norm, clipping, lr-multiplier scaling) and of the EMA teacher. Eager
PyTorch would launch a few kernels per variable from Python instead; these helpers do the same
arithmetic with ``torch._foreach_*`` (one call per list of tensors), as PyTorch's own
optimizers, ``clip_grad_norm_`` and EMA code do. Each is pinned to the generic keras.ops
formula it replaces in tests/test_train_step.py (``test_torch_fused_paths_equal_the_generic_loops``).

Every function takes plain torch tensors (a Keras variable's ``.value``) and works in place
where it says so; call them under ``torch.no_grad()``.
"""
from __future__ import annotations

def global_norm(tensors):
    """sqrt(sum of squares) over every tensor (float32, 0-dim): the norm of their
    concatenation, as ``clip_grad_norm_`` computes it."""
    import torch

    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t if t.dtype == torch.float32 else t.float() for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


def scale_(tensors, scale):
    """tensors *= scale (a 0-dim tensor), in place."""
    import torch

    if tensors:
        torch._foreach_mul_(tensors, scale)


def copies(tensors):
    """New tensors holding the values of ``tensors``."""
    import torch

    return torch._foreach_mul(tensors, 1.0) if tensors else []


def scaled_updates_(groups):
    """For each ``(variables, old, m)``: ``variables = old + m * (variables - old)`` in place
    (the lr-multiplier rule of ``poa_keras.optimizers.scaled_update``), ``m`` a float or a
    0-dim tensor shared by the group; ``old`` is overwritten."""
    import torch

    for news, olds, m in groups:
        if not news:
            continue
        delta = torch._foreach_sub(news, olds)
        torch._foreach_mul_(delta, m if isinstance(m, float) else m.to(news[0].dtype))
        torch._foreach_add_(olds, delta)
        torch._foreach_copy_(news, olds)


def ema_(teacher, student, momentum):
    """``teacher = m * teacher + (1 - m) * student`` in place, m a 0-dim float32 tensor (the
    teacher and student tensors float32)."""
    import torch

    if not teacher:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))
