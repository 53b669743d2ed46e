"""The glue behind each ``moedistill`` verb: config in, library calls, files out.

One module per verb that needs more than a screen of glue (``compress``, ``cache``,
``train``, ``eval``, ``run``); ``common`` holds what several verbs resolve the same way
from a config (the teacher, its tokenizer, a split's packed blocks). The library
modules (``moedistill.cache``, ``compression``, ``losses``, ``trainer``, ``stages``,
``evaluate``) take objects, not configs, and are what tests and the Python API call.
"""
