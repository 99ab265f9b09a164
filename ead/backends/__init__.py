"""Backends that run a model outside PyTorch. Each module holds the runners for one engine, with the interfaces
of `ead.runner` (batch 1: `ModelRunner`; batched: `HFBatchRunner`), so the engine never knows which it drives.

- `llamacpp`: GGUF files through llama.cpp on the CPU (`pip install 'ead[llamacpp]'`).
"""
