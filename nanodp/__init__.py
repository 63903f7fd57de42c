"""nanodp: a compact LLM inference engine with Double-P sparse decode attention.

kernels/ at the repository root is installed as `nanodp.kernels` (pyproject.toml's package-dir), so an
unrelated top-level `kernels` package can never shadow ours; run.sh installs the checkout editable.
"""

__version__ = "0.1.0"

from .api import LLM, Output  # noqa: E402
from .sampler import SamplingParams  # noqa: E402

__all__ = ["LLM", "Output", "SamplingParams"]
