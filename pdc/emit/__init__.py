"""The emit layer: every file written from a rewritten program.

`pruned.emit_pruned` runs them for a prune stage: the Hugging Face checkpoint (`checkpoint`), the
exported program and ONNX model (`artifacts`, from the one `seal` of the program), the identities
and fingerprints the lock pins (`fingerprint`). The lock (`lock`) and the model cards
(`model_card`) are documents built from the stage records. (The training stages' launch files,
which start `pdc.stages.train.worker`, are written by `pdc.stages.train.launch_files`.) Nothing
here re-traces a checkpoint.
"""
