"""phi3-export: quantize Phi-3-family checkpoints to 4 bits and export them for devices."""

from phi3_export.versions import tool_version

__version__ = tool_version()


def quantize(*args, **kwargs):
    """See :func:`phi3_export.api.quantize`."""
    from phi3_export.api import quantize as _quantize

    return _quantize(*args, **kwargs)


def make_fixture(recipe, out, **kwargs):
    """A tiny checkpoint of ``recipe`` (name, path or Recipe); see :func:`phi3_export.fixtures.tiny.make_fixture`."""
    from phi3_export.fixtures.tiny import make_fixture as _make
    from phi3_export.recipes import load_recipe

    return _make(load_recipe(recipe) if isinstance(recipe, str) else recipe, out, **kwargs)


__all__ = ["__version__", "make_fixture", "quantize"]
