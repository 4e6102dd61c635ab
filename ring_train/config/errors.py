class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""
