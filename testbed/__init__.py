"""testbed: a hardware-in-the-loop testbed for multi-user speculative LLM inference at the edge.

It reproduces Multi-SPIN (arXiv 2606.04581): devices draft tokens with small llama.cpp models,
upload them over one FDMA-shared uplink band (emulated with Linux ``tc``), and an edge server
verifies all drafts of a round in one batch. See README.md for the flow and the commands.
"""

__version__ = "0.1.0"
