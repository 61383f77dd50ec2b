"""The inputs a run reads: model sources, text corpora and the `pdc setup` assets.

`models` turns a spec's model source into a local checkpoint directory, `data` turns a corpus
into packed token blocks, `assets` installs the embedded defaults, `cache` is where they live.
"""
