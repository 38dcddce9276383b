"""Sherlock-format data: readers, exact TR alignment, the prepared store, the dataset and a synthetic ground truth.

Readers (``video``, ``audio``, ``text``, ``fmri``) import their heavy libraries
(PyAV, librosa, EnCodec, sentence-transformers, nibabel) only when used.
"""
