"""crate-mae: masked autoencoding with CRATE, the white-box transformer of sparse rate reduction.

`import crate_mae.model` registers the models with timm (`timm.create_model("crate_mae_base")`); so does
`import crate_mae` when timm is already imported (`import timm, crate_mae`). The package itself imports neither
torch nor timm, so that the configs and the command lines' `--help` load in a blink.
"""
import sys

__version__ = "0.1.0"

if "timm" in sys.modules:  # timm is loaded already: registering costs nothing more
    from crate_mae import model  # noqa: F401  (registers the timm entry points)
