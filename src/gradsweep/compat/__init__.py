"""The private parts of other libraries that gradsweep relies on, fenced: one module per library.

* :mod:`gradsweep.compat.hydra`: hydra-core's ``hydra._internal``, a job's return value, the text
  Hydra prints that gradsweep rewords, and the loggers its launcher plugins announce jobs on;
* :mod:`gradsweep.compat.optuna`: the Optuna sweeper plugin's ``_impl`` and Optuna's trial id;
* :mod:`gradsweep.compat.submitit`: how long a submitit job waits for its result file;
* :mod:`gradsweep.compat.cpython`: the interpreter's own exit steps.

Each use is a small named function (or a subclass) whose docstring says what it relies on and why
the public API does not serve. ``tests/test_compat.py`` checks every assumption against the
installed library, naming the function here that an upgrade broke; ``tests/test_layers.py`` fails
on a private use anywhere else in the package.

May import: the libraries it wraps and the shared modules — never a gradsweep layer. Every layer
may import it; importing ``gradsweep.compat.<lib>`` counts, for the layering, as importing ``<lib>``.
"""
