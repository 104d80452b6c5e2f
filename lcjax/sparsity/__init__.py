"""Sparsity techniques: activation sparsity (chess), sparse attention and sparse verification."""
