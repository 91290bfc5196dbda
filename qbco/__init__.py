"""qbco: align a 4-bit quantized causal LM with LoRA and BCO on thumbs-up / thumbs-down feedback."""

__version__ = "0.1.0"
__all__ = ["Scorer"]


def __getattr__(name: str):
    # Lazily, so that `import qbco` (and the CLI's start) stays cheap: Scorer needs torch and transformers.
    if name == "Scorer":
        from qbco.score import Scorer

        return Scorer
    raise AttributeError(f"module 'qbco' has no attribute {name!r}")
