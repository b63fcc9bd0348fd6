"""The served path: the serving spec, the Triton repository it generates, and the python steps."""
