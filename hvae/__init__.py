"""hvae: hierarchical VAEs that fill in missing image regions."""
