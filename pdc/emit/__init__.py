"""The emit layer: every file written from a rewritten program.

The Hugging Face checkpoint (`checkpoint`), the exported program and ONNX model (`artifacts`),
the lock and its fingerprints (`lock`), and the training stages' launch files. Each output is
produced from the same `pdc.graph.program.Program`; none re-traces a checkpoint.
"""
