"""The command-line layer: the ``gradsweep`` console script and ``train.py``'s one-line errors.

May import every layer; nothing imports it but ``src/train.py``.
"""
