"""The bottom layer: errors, atomic files, progress of long waits, the launcher's rank. Imports nothing of qbco."""
