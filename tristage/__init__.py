"""tristage: PixArt-alpha's three-stage training recipe.

The code lives in role folders at the top of the repository (``train/``, ``data/``, ``demo/``,
``bench/``); an installed wheel maps them to ``tristage.train``, ``tristage.data``, ... through
setuptools' ``package-dir`` (pyproject.toml), so no generic top-level name (``train``, ``data``) is ever
put on ``sys.path`` and a user's own ``data/`` package cannot shadow ours.  In a source checkout the
folders sit beside this package instead, so the checkout root is added to its search path.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "train" / "training" / "trainer.py").is_file() and str(_CHECKOUT) not in __path__:
    __path__.append(str(_CHECKOUT))
