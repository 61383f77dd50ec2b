"""The stages of a recipe: teacher correction, pruning (width, depth), distillation, evaluation.

Each stage function takes its lowered settings and input directories, writes its outputs into
a temporary stage directory and returns its typed result (`pdc.plan.results`).
"""
