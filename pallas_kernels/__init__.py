"""pallas_kernels: accelerator kernels with plain-jnp references; knows nothing of lcjax."""
