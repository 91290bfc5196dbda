"""Models: names and loading (4-bit or float), LoRA and the reference (adapters off), the one log-prob path, the
memory estimate and the reference cache. Imports qbco.data and qbco.common."""
