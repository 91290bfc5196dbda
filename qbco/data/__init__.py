"""Feedback data: the file reader, binarizing scores and pairs, the hub registry, feedback rows and their
tokenization. Imports only qbco.common."""
