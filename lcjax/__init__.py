"""lcjax: JAX/Flax implementation of the LongCat model family."""
