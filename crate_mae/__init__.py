"""crate-mae: masked autoencoding with CRATE, the white-box transformer of sparse rate reduction.

Importing the package registers the models with timm (`timm.create_model("crate_mae_base")`).
"""
from crate_mae import model  # noqa: F401  (registers the timm entry points)

__version__ = "0.1.0"
