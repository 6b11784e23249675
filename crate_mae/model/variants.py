"""The size table lives with the config (crate_mae/config/variants.py), which imports no torch; re-exported here."""
from crate_mae.config.variants import FAMILIES, VARIANTS, Family, Variant, match_variant

__all__ = ["FAMILIES", "VARIANTS", "Family", "Variant", "match_variant"]
