"""Reading checkpoints and task files, writing outputs, accounting for memory."""
