"""The demo's own code (not the library): the built-in suite, fine-tuning, evaluation, the toy family."""
