"""The command line: a parser and thin handlers over typed library calls."""
