"""llama.cpp speculative engine (see docs/engine.md)."""
