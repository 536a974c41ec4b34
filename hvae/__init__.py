"""hvae: hierarchical VAEs that fill in missing image regions."""

__all__ = ["load"]


def __getattr__(name: str):
  # Lazy (PEP 562): `import hvae.data` must not pull in JAX, orbax and the model just for `load`.
  if name == "load":
    from hvae.api import load

    return load
  raise AttributeError(f"module 'hvae' has no attribute {name!r}")
