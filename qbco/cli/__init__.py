"""The command line: flags, progress bars and every table; each command calls one library function."""
