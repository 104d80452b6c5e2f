"""Training entrypoint (`python -m lcjax.train`)."""
