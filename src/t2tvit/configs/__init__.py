"""Training recipes shipped with the package, as YAML."""
