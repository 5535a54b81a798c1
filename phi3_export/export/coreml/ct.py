"""Imports coremltools quietly.

On Linux it logs a warning per native proxy it cannot load (prediction needs macOS), and
one about the torch version (we never convert from torch); its pass pipelines draw tqdm
bars. Our own progress output says what is happening instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging


def coremltools():
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    finally:
        logger.setLevel(level)
    return ct


@contextlib.contextmanager
def quiet_passes():
    """No tqdm bars from coremltools' pass pipelines while converting."""
    from coremltools.converters.mil.mil.passes import pass_pipeline

    original = pass_pipeline.tqdm
    pass_pipeline.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        pass_pipeline.tqdm = original
