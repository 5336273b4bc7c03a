"""Triton multi-tensor kernels, installed as ``fastasam.kernels``.

This folder is a package only as ``fastasam.kernels``. Where a checkout's root is on ``sys.path`` (``python -m`` or
``python -c`` run from it, a test runner's ``pythonpath``), it would also be found as a top-level ``kernels`` and
hide the package installed under that name (Hugging Face's ``kernels``, which ``transformers`` imports). Imported
under any name but its own, it hands the name over to the package found on the rest of ``sys.path``; when there is
none it stays an empty module, which no importer mistakes for that package (no ``__version__``, no attributes).
"""

if __name__ != "fastasam.kernels":
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _PathFinder.find_spec(__name__, _rest)
    if _spec is not None:  # the import statement returns what sys.modules holds once this module has run
        _module = _module_from_spec(_spec)
        _sys.modules[__name__] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del _sys.modules[__name__]
            raise
    del _os, _sys, _PathFinder, _module_from_spec, _root, _rest, _spec
