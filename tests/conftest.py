import jax

# The paper's accuracy claims are float64 claims; the library itself never
# flips this flag, the tests do.
jax.config.update("jax_enable_x64", True)
