class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or used as asked; the message names the directory,
    file or key at fault and what was found instead."""
