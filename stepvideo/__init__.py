"""Step-Video-T2V inference: DiT, text encoders, Video-VAE, service and parallel runner.

Importing this package has no side effects (no argparse, no CUDA initialisation).
"""

__version__ = "0.1.0"
