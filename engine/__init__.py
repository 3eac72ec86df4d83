"""wafer engine: GGUF loading, Numba kernels, the Llama forward pass, scheduling and serving."""
