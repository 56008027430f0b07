"""Triton kernels of ttkernels (installed as ``ttkernels._triton_kernels``): the ``triton`` backend.

``backend`` is the step-function table the op registry calls; ``shrink``, ``gemm`` and ``grads`` hold the
kernels and their launchers; ``_common`` the dropout hash, launch configurations and allocation; ``aot``
compiles every kernel for a GPU architecture without a GPU. Importing this package imports triton; the op
registry imports it on the first ``backend="triton"`` call only. See README, "The Triton backend".
"""
