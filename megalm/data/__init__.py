"""The data room: corpus -> clean -> tokenizer -> indexed .bin/.idx -> fixed-length samples -> batches.

- ``corpus.py``     where documents come from (files, folders, JSONL; the embedded stdlib corpus by default)
- ``tokenizer.py``  byte-level BPE training/loading, the end-of-document token, padded model vocabulary
- ``indexed.py``    the memory-mapped PREFIX.bin/PREFIX.idx format, its writer and its validating reader
- ``preprocess.py`` ``megalm preprocess``: the pipeline that ties the above together with worker processes
- ``dataset.py``    by-document splits, shuffled fixed-length samples, the resumable data-parallel sampler

Submodules are imported on demand so that ``preprocess`` never pays for torch.
"""
