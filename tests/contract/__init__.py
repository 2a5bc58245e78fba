"""Contract tests: tierq against recorded-style API transcripts, served by an independent replay server."""
