"""qbco: align a 4-bit quantized causal LM with LoRA and BCO on thumbs-up / thumbs-down feedback."""

__version__ = "0.1.0"
__all__ = ["Scorer"]


def __getattr__(name: str):
    if name == "Scorer":
        from qbco.eval.score import Scorer  # here: `import qbco` stays cheap (Scorer imports torch)

        return Scorer
    raise AttributeError(f"module 'qbco' has no attribute {name!r}")
