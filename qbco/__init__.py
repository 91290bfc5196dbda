"""qbco: align a 4-bit quantized causal LM with LoRA and BCO on thumbs-up / thumbs-down feedback."""

__version__ = "0.1.0"
