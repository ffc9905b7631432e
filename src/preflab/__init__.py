"""preflab: the InstructGPT post-training recipe, end to end.

Importing the package is cheap on purpose: torch and transformers load only
when a command or module that needs them is imported.
"""

__version__ = "0.1.0"
