"""The `t2tvit` command line: each subcommand parses its flags and calls one library function."""
