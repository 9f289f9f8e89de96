"""Triton kernels and their plain-PyTorch references.

* :mod:`.block_mask`: ``BlockMask``, one block-sparse mask bound to its sequence length and block size.
* :mod:`.attention`: ``sparse_attention``, the one entry point that picks dense / FA4 / Triton / chunked.
* :mod:`.block_sparse_attention`: the Triton kernel (key padding included); :mod:`.reference` its references.
* :mod:`.fa4_block_sparse`: FlashAttention-4's block-sparse forward as an optional back-end.
* :mod:`.gluon_block_sparse`: a warp-specialised Gluon forward for Hopper (``kernel="gluon"``).
* :mod:`.bitpack`: the packed (one bit per block pair) form of a mask.
* :mod:`.compile_errors`: whether an error is a Triton kernel failing to compile here (work done another way).
* :mod:`.block_softmax`: each key block's own softmax numerators, the sensitivity pass's first step.
* :mod:`.mass_statistics`: the profiler's attention-mass sums of a chunk of rows, read from the logits (Triton on CUDA; their references).
"""
