"""Triton kernels of ttkernels (installed as ``ttkernels._triton_kernels``): the ``triton`` backend.

``backend`` is the step-function table the op registry calls; one file per step holds its kernels and
launchers (``shrink``, ``mid``, ``grad_dy``, ``grad_mid``, ``grad_a``; ``factors`` for the factor sides), ``gemm``
the GEMM that serves both expand and grad_x, ``rows`` the cublas plan's whole-pass kernels (see the table in
``ttkernels.ops``); ``_common`` the dropout hash, launch configurations and allocation; ``aot``
compiles every kernel for a GPU architecture without a GPU. Importing this package imports triton; the op
registry imports it on the first ``backend="triton"`` call only. See README, "The Triton backend".
"""
