"""The native decoder: transformer.py (the math), kv_cache.py (its memory), loader.py (HF weights -> ours)."""
