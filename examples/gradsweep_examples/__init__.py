"""A small package a user could have written, used by gradsweep only through `model=custom` and
`data=custom` (put `examples/` on PYTHONPATH): a character-level GPT and text that ships with every
Python installation."""
