"""The command line: each command parses options, calls the library API, renders the result."""
